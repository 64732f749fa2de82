"""SmoothQuant (Xiao et al., 2023): move the activations' outlier scale into the weights, so that
both are easy to quantize per tensor (W8A8).

A linear layer computes y = W x. For any positive per-input-channel s,

    y = (W diag(s)) (diag(s)^-1 x)

so dividing activation channel j by s_j and multiplying weight column j by s_j changes nothing in
exact arithmetic. SmoothQuant picks, from calibration activations X and the weights W of every layer
that reads X,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          (max|W_j| over the column j of every reader)

alpha = 0.5 splits the difficulty evenly: afterwards max|X_j / s_j| = max|W_j s_j| = sqrt(max|X_j| max|W_j|).
alpha = 1 makes every activation channel's max 1 (all of the range moves into the weights); alpha = 0
makes every weight column's max 1 (the weights' range moves into the activations).

diag(s)^-1 is folded into whatever produced X, so smoothing costs nothing at run time:
- the RMSNorm before q/k/v and before gate/up: norm.weight_j <- norm.weight_j / s_j (SmoothQuant's own pairs);
- v_proj's output rows before o_proj, and up_proj's rows before down_proj (the attention and
  act(gate) * up are linear in them; AWQ folds its scales into the same pairs). With grouped-query
  attention a v row feeds several o_proj columns, so the v -> o pair is smoothed only without it.
The activation maxima come from the original model (one pass over `calib`): each fold changes only
its own pair's input, so the others' maxima stay valid. The v -> o and up -> down pairs go first in
each block, so that the norm pairs' max|W_j| sees v_proj's and up_proj's final rows.

On `qlearn.outliers.emulate_outliers`'s variant SmoothQuant wins by construction: the emulation is a
per-channel scale f_j, and s_j becomes f_j times its value on the original model (for any alpha), so
smooth(variant) is smooth(original) up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..outliers import channel_absmax, check_calib, decoder_layers

__all__ = ["smooth", "smoothing_scales"]

SCALE_FLOOR = 1e-5  # SmoothQuant's reference code clamps max|W| and s here, so that s is never 0


def _check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1] (SmoothQuant uses 0.5; 0.75-0.85 for the "
                         f"hardest models), got {alpha!r}")


def smoothing_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float = 0.5) -> Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (module docstring); act_absmax (in,), weights (out_k, in)."""
    _check_alpha(alpha)
    if not weights or any(w.dim() != 2 or w.shape[1] != act_absmax.numel() for w in weights):
        raise ValueError(f"weights must be a non-empty list of (out, {act_absmax.numel()}) tensors, got "
                         f"{[tuple(w.shape) for w in weights]}")
    w_absmax = torch.cat([w.detach().abs().float() for w in weights]).amax(dim=0).clamp(min=SCALE_FLOOR)
    act = act_absmax.float().to(w_absmax.device)  # calibration statistics are kept on the CPU
    return (act.pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=SCALE_FLOOR)


@torch.no_grad()
def smooth(model: nn.Module, calib: Tensor, alpha: float = 0.5) -> nn.Module:
    """Smooth a Llama-style model in place (module docstring) and return it.

    calib: (batch, seq) LongTensor of token ids; the per-channel max|X| of every linear input comes from it.
    """
    _check_alpha(alpha)
    calib = check_calib(calib, model)
    layers = decoder_layers(model)
    # Step 1: max|X_j| of every linear input, on the model as it is.
    absmax = channel_absmax(model, calib)
    names = {m: n for n, m in model.named_modules()}
    for block in layers:
        attn, mlp = block.self_attn, block.mlp
        # v -> o and up -> down first: they rescale rows of v_proj and up_proj, whose columns the
        # norm pairs then read (in the other order the norm pairs' balance would be undone)
        pairs = [(mlp.up_proj, [mlp.down_proj]),
                 (block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                 (block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])]
        if attn.v_proj.out_features == attn.o_proj.in_features:  # no grouped-query attention
            pairs.insert(0, (attn.v_proj, [attn.o_proj]))
        for producer, readers in pairs:
            # Step 2: s from the readers' shared input and weights.
            s = smoothing_scales(absmax[names[readers[0]]], [r.weight for r in readers], alpha)
            # Step 3: fold diag(s)^-1 into the producer (norm weight, or output rows) ...
            if isinstance(producer, nn.Linear):
                producer.weight.div_(s.to(producer.weight)[:, None])
            else:
                producer.weight.div_(s.to(producer.weight))
            # ... and diag(s) into the readers' columns.
            for r in readers:
                r.weight.mul_(s.to(r.weight)[None, :])
    return model
