"""Round-to-nearest (RTN) weight quantization with groups: the baseline every PTQ method is measured
against, and the grid that GPTQ, AWQ and HQQ reuse.

A weight W (out_features x in_features) is cut, row by row, into groups of `group_size` consecutive
input features (None: the whole row is one group, i.e. per output channel). Each group gets its own
asymmetric (min-max) grid with b bits:

    scale = (max - min) / (2^b - 1),   zero_point = round(-min / scale)
    q     = clamp(round(w / scale) + zero_point, 0, 2^b - 1)
    w_hat = scale * (q - zero_point)

or, with symmetric=True, scale = absmax / (2^(b-1) - 1), zero_point = 0, q in [-2^(b-1), 2^(b-1) - 1].
Storage: b bits per weight plus, per group, an fp16 scale and an fp16 zero point
(b + 32 / group_size bits per parameter; symmetric: b + 16 / group_size).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_args", "fake_quantize", "minmax_params", "quantize_rtn"]


def check_args(w: Tensor, bits: int, group_size: int | None) -> None:
    """The checks every weight quantizer here shares (a 2-D finite float weight, bits, group size)."""
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D float tensor (out_features, in_features), got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    if not torch.isfinite(w).all():
        raise ValueError("w contains NaN or inf")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1 or w.shape[1] % group_size):
        raise ValueError(f"group_size must be None or a positive int dividing in_features={w.shape[1]}, "
                         f"got {group_size!r}")


def minmax_params(w: Tensor, bits: int, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Per-row `(scale, zero_point)`, each of shape (rows, 1), for a 2-D `w` (rows = groups)."""
    # TODO(linear.py): take these from qlearn.quant.linear.quantize(w, bits, symmetric, axis=0) once it
    # lands, so that the course has one copy of the scale/zero-point formulas.
    w = w.float()
    if symmetric:
        scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        return scale.clamp(min=1e-12), torch.zeros_like(scale)
    lo = w.amin(dim=1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-12)  # a constant-zero group must not divide by 0
    return scale, torch.round(-lo / scale)


def fake_quantize(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool = False) -> Tensor:
    """Quantize `w` on a given grid and dequantize: scale * (clamp(round(w / scale) + zp) - zp)."""
    # TODO(linear.py): use linear's quantize-with-given-parameters function if it offers one.
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    q = torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax)
    return scale * (q - zero_point)


@torch.no_grad()
def quantize_rtn(w: Tensor, bits: int, group_size: int | None = None, *, symmetric: bool = False) -> Tensor:
    """Round-to-nearest, per output row or per group of `group_size` input features; returns the
    dequantized weight (w's shape and dtype)."""
    check_args(w, bits, group_size)
    rows, cols = w.shape
    group = group_size or cols
    groups = w.float().reshape(rows * cols // group, group)  # (rows * groups_per_row, group_size)
    scale, zero_point = minmax_params(groups, bits, symmetric)
    return fake_quantize(groups, scale, zero_point, bits, symmetric).reshape(rows, cols).to(w.dtype)
