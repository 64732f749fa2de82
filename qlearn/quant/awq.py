"""AWQ (Lin et al., 2023, "Activation-aware Weight Quantization"): protect the weights that meet
large activations by scaling their input channels up before quantizing.

For a linear layer y = W x, scaling input channel k of W by s_k and the activation by 1 / s_k
changes nothing in full precision, but the quantization error of that channel's weights shrinks
relative to them (the group's scale hardly moves when one channel grows), so

    y ~= Q(W diag(s)) diag(s)^-1 x

protects the salient channels. AWQ searches s from the mean activation magnitude of calibration data,

    s = mean|x|^alpha,  alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}   (normalized: sqrt(max s * min s) = 1)

keeping the alpha with the smallest output error || Q(W diag(s)) diag(s)^-1 X - W X ||^2
(alpha = 0 is plain RTN, so AWQ's choice is never worse on the calibration data).
In deployment diag(s)^-1 is folded into the previous operator (RMSNorm weight, or the previous linear
layer's output rows), so s costs no storage; here (simulated quantization) the returned weight
Q(W diag(s)) diag(s)^-1 is mathematically the same layer. Layers that read the same input (q, k, v;
gate, up) must share one s: pass their weights concatenated along the output dimension.

AWQ's reference implementation follows the scale search with a second, smaller search (`clip=True`):
for each output row and group, the clipping range [r min, r max], r in {1, 0.95, ..., 0.55}, with the
smallest error of that group's share of the output, || (W_g - Q(clip_r(W_g))) X_g ||^2: cutting the
largest weights of a group a little makes the grid finer for all the others.

The result is a `QTensor` of W diag(s) whose `input_scale` is s, so `.dequantize()` is the effective
weight Q(W diag(s)) diag(s)^-1 (s folded away: no storage).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import linear, rtn
from .linear import QTensor

__all__ = ["activation_scale", "awq_quantize", "clip_search"]


def activation_scale(x: Tensor) -> Tensor:
    """Mean |x| per input channel over all tokens: `x` (..., in_features) -> (in_features,)."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of shape (..., in_features), got {getattr(x, 'shape', x)!r}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf: the calibration activations must be finite")
    return x.reshape(-1, x.shape[-1]).float().abs().mean(dim=0)


def _check_x(x: Tensor, cols: int) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[-1] != cols:
        raise ValueError(f"x must be the layer's inputs, shape (..., {cols}), got {tuple(getattr(x, 'shape', ()))}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf: the calibration activations must be finite")


@torch.no_grad()
def clip_search(w: Tensor, x: Tensor, bits: int, group_size: int | None = None, *, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 256, symmetric: bool = False) -> QTensor:
    """RTN of `w` with, per output row and group, the clipping ratio r that minimizes the group's
    output error on (a subsample of `n_tokens` of) the inputs `x`. Returns the QTensor."""
    rtn.check_args(w, bits, group_size)
    _check_x(x, w.shape[1])
    return _clip_search(w.float(), x, bits, group_size, n_grid, max_shrink, n_tokens, symmetric)


def _clip_search(w, x, bits, group_size, n_grid, max_shrink, n_tokens, symmetric) -> QTensor:
    rows, cols = w.shape
    group = group_size or cols
    X = x.reshape(-1, cols).float()
    X = X[:: max(1, X.shape[0] // n_tokens)]  # evenly spaced tokens: the search is per group, cheap
    Wg = w.reshape(rows, cols // group, group)  # (rows, groups, group_size)
    Xg = X.reshape(-1, cols // group, group)  # (tokens, groups, group_size)
    best_error = torch.full((rows, cols // group), float("inf"), device=w.device)
    best_codes = torch.zeros_like(Wg)
    best_scale = torch.zeros(rows, cols // group, 1, device=w.device)
    best_zero = torch.zeros_like(best_scale)
    for i in range(round(max_shrink * n_grid)):
        r = 1 - i / n_grid
        # Step 1: RTN on grids shrunk to r times each group's range (values beyond it are clamped).
        scale, zero = linear._scale_zero_point(Wg, bits, symmetric, 3, None, group, r)  # (rows, groups, 1)
        codes = rtn._round(Wg, scale, zero, bits, symmetric)
        # Step 2: each group's contribution to the output error, (rows, groups).
        error = torch.einsum("rgk,ngk->rgn", Wg - (codes - zero) * scale, Xg).pow(2).mean(dim=-1)
        # Step 3: keep, per row and group, the best ratio so far.
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
        best_scale = torch.where(better.unsqueeze(-1), scale, best_scale)
        best_zero = torch.where(better.unsqueeze(-1), zero, best_zero)
    return rtn._state(best_codes.reshape(rows, cols), best_scale, best_zero, bits, symmetric, group_size, w)


@torch.no_grad()
def awq_quantize(w: Tensor, x: Tensor, bits: int, group_size: int | None = None, *,
                 n_grid: int = 20, clip: bool = True, n_tokens: int = 1024,
                 symmetric: bool = False) -> tuple[QTensor, Tensor, float]:
    """Return `(state, s, alpha)`: the QTensor of W diag(s) with `input_scale` s (its `.dequantize()` is
    the effective weight Q(W diag(s)) diag(s)^-1 in w's dtype), the per-input-channel scales, the alpha.

    `x`: calibration inputs of the layer, (..., in_features); `bits`, `group_size`, `symmetric` as in
    `rtn.quantize_rtn`; `clip`: follow with `clip_search` (as AWQ's reference code does).
    """
    rtn.check_args(w, bits, group_size)
    _check_x(x, w.shape[1])
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int (AWQ uses 20), got {n_grid!r}")
    W = w.float()
    X = x.reshape(-1, x.shape[-1]).float()  # (N, in_features)
    # Step 1: how large each input channel's activations are, on average (all tokens); the search
    # below measures its error on about `n_tokens` evenly spaced tokens, which is plenty for a choice
    # among n_grid values and keeps it cheap.
    x_mean = X.abs().mean(dim=0).clamp(min=1e-8)
    X = X[:: max(1, X.shape[0] // n_tokens)]
    y = X @ W.T  # (N, out_features): the full-precision output
    axis = 0 if group_size is None else None
    best = (float("inf"), None, 0.0)
    for i in range(n_grid):
        alpha = i / n_grid
        # Step 2: candidate scales, normalized so that they straddle 1.
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        # Step 3: quantize the scaled weight, fold the scale back, measure the output error.
        scaled = W * s
        scale, zero = linear._scale_zero_point(linear._grouped(scaled, group_size), bits, symmetric, 2, axis,
                                               group_size)
        codes = rtn._round(linear._grouped(scaled, group_size), scale, zero, bits, symmetric)
        w_hat = ((codes - zero) * scale).reshape(W.shape) / s
        error = (X @ w_hat.T - y).pow(2).mean().item()
        # Step 4: keep the best alpha.
        if error < best[0]:
            best = (error, s, alpha)
    _, s, alpha = best
    # Step 5: the grid of W diag(s), with the clipping search (inputs x / s) or plain min-max.
    if clip:
        state = _clip_search(W * s, X / s, bits, group_size, 20, 0.5, 256, symmetric)
    else:
        state = linear.quantize(W * s, bits, symmetric, axis, group_size)
    state.input_scale, state.dtype = s, w.dtype
    return state, s, alpha
