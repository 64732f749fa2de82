"""Outlier features: measuring them, and a variant of a Llama-style model that has them.

What the papers report for large models:
- LLM.int8 (Dettmers et al., 2022, Sec. 4): from about 6.7B parameters, a few hidden dimensions
  (about 6 of 4096) carry activations up to 20x larger than the others, systematically in the same
  dimensions in every layer; vector-wise int8 breaks there.
- SmoothQuant (Xiao et al., 2023, Sec. 3): activation outliers about 100x larger than most values,
  in fixed channels, while the weights are flat and easy to quantize.
- Massive activations (Sun et al., 2024): on a few tokens (the first one, delimiters), a few
  residual-stream dimensions reach values thousands of times the median.
Real models grow such channels in training. The course's small model did not (measure it with
`channel_absmax`: the largest channel of a linear layer's input is about 1.5-2x the median channel in
the residual stream, 3-7x in the MLP), so `emulate_outliers` makes a variant that has them.

`channel_absmax(model, calib)` is the per-channel absmax of every linear layer's input,

    absmax[name][j] = max over calibration tokens t of |x_tj|        (x: the layer's input)

`emulate_outliers(model, ...)` returns a new model (the input model is untouched) that computes the same
function (logits equal within float32 rounding) but whose linear layers read a few outlier channels.
It is the inverse of SmoothQuant: a positive scale f_j on channel j of an activation, undone in the
weights that read it,

    y = W x = (W diag(f)^-1) (diag(f) x)

applied where the scale can be produced for free:
- residual-stream channels C (the same in every layer, as LLM.int8 finds): every RMSNorm weight
  gets w_j <- f w_j and every layer that reads a norm (q/k/v, gate/up, lm_head) W[:, j] <- W[:, j] / f;
- o_proj inputs (the attention output): v_proj's output rows v_j <- f v_j (attention mixes tokens
  linearly, so the scale passes through) and o_proj's columns W_o[:, j] <- W_o[:, j] / f;
- down_proj inputs (act(gate) * up, linear in up): up_proj's rows u_j <- f u_j, down_proj's columns
  W_d[:, j] <- W_d[:, j] / f. Chosen among the channels whose activations are the most token-sparse
  (largest max / median of |x| over tokens) when `calib` is given: then the outliers sit on a few tokens
  only, like the FFN activations behind Sun et al.'s massive activations.

Honest limits. A per-channel rescaling is exactly what SmoothQuant computes and what a rotation with
RMSNorm folded first absorbs: on this variant both recover by construction (smooth(variant) equals
smooth(original) up to rounding). Token-dependent outliers in the residual stream itself (massive
activations) cannot be made by any change of the weights that keeps the function, because RMSNorm
mixes all channels of a token; the token-sparse MLP channels above are the closest exact emulation.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from . import modules

__all__ = ["channel_absmax", "channel_absmean", "check_calib", "decoder_layers", "emulate_outliers", "outlier_ratio"]


def check_calib(calib, model: nn.Module | None = None) -> Tensor:
    """`calib` as a (batch, seq) integer tensor of token ids, or a clear error: it must be given, 2-D,
    of an integer dtype, non-empty, no longer than the model's context, with ids inside its vocabulary."""
    if calib is None:
        raise ValueError("calib is missing: pass a (batch, seq) LongTensor of token ids, e.g. "
                         "qlearn.evaluate.token_windows(tokenizer)[:8]")
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.is_floating_point() or calib.numel() == 0:
        raise ValueError(f"calib must be a non-empty (batch, seq) LongTensor of token ids, got "
                         f"{getattr(calib, 'dtype', type(calib).__name__)} of shape {tuple(getattr(calib, 'shape', ()))}")
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and calib.shape[1] > context:
        raise ValueError(f"calib has sequences of width {calib.shape[1]}, wider than the model's context "
                         f"of {context} tokens: use windows of at most {context}")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and (calib.min() < 0 or calib.max() >= vocab):
        raise ValueError(f"calib holds token ids outside 0..{vocab - 1} (the model's vocabulary)")
    return calib.long()


def channel_absmax(model: nn.Module, calib: Tensor, *, targets=None, exclude=(),
                   batch_size: int = 8) -> dict[str, Tensor]:
    """{layer name: (in_features,) float32 tensor}: max over the calibration tokens of |x_j| for every
    nn.Linear the targets/exclude rule of `qlearn.modules.linear_layers` selects (all by default,
    lm_head included). The model is not changed (eval mode for the passes, then its mode back)."""
    return _channel_stats(model, calib, "max", targets, exclude, batch_size)


def channel_absmean(model: nn.Module, calib: Tensor, *, targets=None, exclude=(),
                    batch_size: int = 8) -> dict[str, Tensor]:
    """As `channel_absmax`, with the mean of |x_j| over the calibration tokens (AWQ's saliency measure)."""
    return _channel_stats(model, calib, "mean", targets, exclude, batch_size)


@torch.no_grad()
def _channel_stats(model, calib, reduce: str, targets, exclude, batch_size: int) -> dict[str, Tensor]:
    calib = check_calib(calib, model)
    layers = modules.linear_layers(model, targets, exclude)
    stats = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in layers.items()}
    tokens = {name: 0 for name in layers}

    def make_hook(name):
        def hook(module, args):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().double().cpu()  # (tokens, in_features)
            if reduce == "max":
                stats[name] = torch.maximum(stats[name], a.amax(dim=0))
            else:
                stats[name] += a.sum(dim=0)
                tokens[name] += a.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in calib.split(batch_size):
            model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if reduce == "mean":
        stats = {name: s / max(tokens[name], 1) for name, s in stats.items()}
    return {name: s.float() for name, s in stats.items()}


def outlier_ratio(absmax: Tensor) -> float:
    """max_j absmax_j / median_j absmax_j: how much larger the largest channel is than the typical one."""
    return (absmax.max() / absmax.median()).item()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-style model (`model.model.layers`), or a clear error."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(
            hasattr(b, "self_attn") and hasattr(b, "mlp") and hasattr(b, "input_layernorm") for b in layers):
        raise TypeError("expected a Llama-style causal LM (model.model.layers with self_attn, mlp and "
                        f"input_layernorm, as in LlamaForCausalLM), got {type(model).__name__}")
    return layers


def _choose(n: int, count_or_indices, generator: torch.Generator, what: str,
            scores: Tensor | None = None) -> Tensor:
    """Channel indices: an explicit list, or `count` of them (the top `scores`, else at random)."""
    if isinstance(count_or_indices, int) and not isinstance(count_or_indices, bool):
        if not 0 <= count_or_indices <= n:
            raise ValueError(f"{what} must be a count in 0..{n} or a list of channel indices, got {count_or_indices}")
        if scores is not None:
            return scores.topk(count_or_indices).indices.sort().values
        return torch.randperm(n, generator=generator)[:count_or_indices].sort().values
    idx = torch.as_tensor(list(count_or_indices), dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= n or idx.unique().numel() != idx.numel()):
        raise ValueError(f"{what} must hold distinct channel indices in 0..{n - 1}, got {idx.tolist()}")
    return idx


@torch.no_grad()
def emulate_outliers(model: nn.Module, *, channels=3, factor: float = 20.0, attn_channels=3,
                     mlp_channels=8, mlp_factor: float = 20.0, calib: Tensor | None = None,
                     seed: int = 0) -> nn.Module:
    """A copy of a Llama-style `model` with outlier channels and the same function (module docstring).

    channels       residual-stream channels made `factor` times larger (a count, chosen at random with
                   `seed`, or a list of indices); the same channels in every layer
    attn_channels  o_proj input channels made `factor` times larger through v_proj (count or list)
    mlp_channels   down_proj input channels made `mlp_factor` times larger through up_proj (count or
                   list): with `calib`, the count most token-sparse channels of each layer, else at random
    The input model is not modified. The chosen indices are stored on the copy as
    `model.outlier_channels` ({"residual": ..., "attn": [...per layer], "mlp": [...per layer]}).
    """
    for name, f in (("factor", factor), ("mlp_factor", mlp_factor)):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
            raise ValueError(f"{name} must be a positive number (1 leaves the channels as they are), got {f!r}")
    layers = decoder_layers(model)
    new = copy.deepcopy(model)
    new_layers = decoder_layers(new)
    g = torch.Generator().manual_seed(seed)
    hidden = new.model.norm.weight.numel()
    # Step 1: the residual-stream channels, scaled in every RMSNorm, unscaled in every reader.
    resid = _choose(hidden, channels, g, "channels")
    s = torch.ones(hidden)
    s[resid] = factor
    sparsity = _token_sparsity(model, layers, calib) if calib is not None else None
    chosen = {"residual": resid.tolist(), "attn": [], "mlp": []}
    for i, block in enumerate(new_layers):
        attn, mlp = block.self_attn, block.mlp
        _scale_norm(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], s)
        _scale_norm(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], s)
        # Step 2: o_proj's input channels, through v_proj's rows (one v row can feed several heads: GQA).
        head_dim = attn.head_dim
        heads = attn.o_proj.in_features // head_dim
        kv_heads = attn.v_proj.out_features // head_dim
        a = _choose(attn.v_proj.out_features, attn_channels, g, "attn_channels")
        s_v = torch.ones(attn.v_proj.out_features)
        s_v[a] = factor
        col = torch.arange(attn.o_proj.in_features)
        o_to_v = (col // head_dim) // (heads // kv_heads) * head_dim + col % head_dim  # v row feeding o column
        attn.v_proj.weight.mul_(s_v.to(attn.v_proj.weight)[:, None])
        attn.o_proj.weight.div_(s_v[o_to_v].to(attn.o_proj.weight)[None, :])
        # Step 3: down_proj's input channels, through up_proj's rows.
        m = _choose(mlp.up_proj.out_features, mlp_channels, g, "mlp_channels",
                    None if sparsity is None else sparsity[i])
        s_m = torch.ones(mlp.up_proj.out_features)
        s_m[m] = mlp_factor
        mlp.up_proj.weight.mul_(s_m.to(mlp.up_proj.weight)[:, None])
        mlp.down_proj.weight.div_(s_m.to(mlp.down_proj.weight)[None, :])
        chosen["attn"].append(a.tolist())
        chosen["mlp"].append(m.tolist())
    _scale_norm(new.model.norm, [new.get_output_embeddings()], s)
    new.outlier_channels = chosen
    return new


def _scale_norm(norm: nn.Module, readers: list[nn.Linear], s: Tensor) -> None:
    """norm.weight <- s * norm.weight; each reader's W[:, j] <- W[:, j] / s_j."""
    norm.weight.mul_(s.to(norm.weight))
    for layer in readers:
        layer.weight.div_(s.to(layer.weight)[None, :])


@torch.no_grad()
def _token_sparsity(model: nn.Module, layers: nn.ModuleList, calib: Tensor) -> list[Tensor]:
    """Per layer, per down_proj input channel: max_t |x_tj| / median_t |x_tj| (large = a few tokens)."""
    calib = check_calib(calib, model)
    seen: list[list[Tensor]] = [[] for _ in layers]

    def make_hook(i):
        def hook(module, args):
            seen[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).abs().float().cpu())
        return hook

    handles = [b.mlp.down_proj.register_forward_pre_hook(make_hook(i)) for i, b in enumerate(layers)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in calib.split(8):
            model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for xs in seen:
        x = torch.cat(xs)  # (tokens, intermediate)
        out.append(x.amax(0) / x.median(0).values.clamp(min=1e-6))
    return out
