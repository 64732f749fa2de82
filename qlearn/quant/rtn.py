"""Round-to-nearest (RTN) weight quantization with groups: the baseline every PTQ method is measured
against, and the grid that GPTQ, AWQ and HQQ reuse. Built on `qlearn.quant.linear`.

A weight W (out_features x in_features) is cut, row by row, into groups of `group_size` consecutive
input features (None: the whole row is one group, i.e. per output channel). Each group gets its own
asymmetric (min-max) grid with b bits (linear.py's formulas):

    scale = (max - min) / (2^b - 1),   zero_point = round(-min / scale)
    q     = clamp(round(w / scale) + zero_point, 0, 2^b - 1)
    w_hat = scale * (q - zero_point)

or, with symmetric=True, scale = absmax / (2^(b-1) - 1), zero_point = 0.
Storage: b bits per weight plus, per group, an fp16 scale and an fp16 zero point
(b + 32 / group_size bits per parameter; symmetric: b + 16 / group_size).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import linear

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
    return linear.compute_scale_zero_point(w, bits, symmetric, axis=0)


def fake_quantize(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool = False) -> Tensor:
    """Quantize `w` on a given grid and dequantize (float32): scale * (codes - zero_point)."""
    return linear.dequantize_codes(linear.quantize_codes(w, scale, zero_point, bits, symmetric), scale, zero_point)


@torch.no_grad()
def quantize_rtn(w: Tensor, bits: int, group_size: int | None = None, *, symmetric: bool = False,
                 clip_ratio: float = 1.0) -> Tensor:
    """Round-to-nearest, per output row or per group of `group_size` input features; returns the
    dequantized weight (w's shape and dtype). `clip_ratio` < 1 shrinks every grid's range."""
    check_args(w, bits, group_size)
    axis = 0 if group_size is None else None  # per output channel, or per group along the row
    return linear.quantize(w, bits, symmetric, axis, group_size, clip_ratio).dequantize()
