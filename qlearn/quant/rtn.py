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
(b + 32 / group_size bits per parameter; symmetric: b + 16 / group_size). GPTQ and AWQ checkpoints pack
their integer zero points in b bits instead: `dataclasses.replace(state, zero_point_bits=bits)` counts
that (4 + 20/128 = 4.156 bits for 4-bit groups of 128).

Every method here and in gptq/awq/hqq returns a `QTensor` (qlearn.quant.linear): `.dequantize()` is the
weight the model computes with, `.bits_per_param()` what it costs. `check_args` is the validation they
share (once per call, at the entry point); `_grid` and `_round` are the unchecked grid and rounding
their inner loops use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import linear

__all__ = ["check_args", "quantize_rtn"]


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


def _qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _grid(w: Tensor, bits: int, symmetric: bool = False, clip_ratio: float = 1.0) -> tuple[Tensor, Tensor]:
    """Unchecked: per-row `(scale, zero_point)`, each (rows, 1), of a 2-D float32 `w` (rows = groups)."""
    return linear._scale_zero_point(w, bits, symmetric, 2, 0, None, clip_ratio)


def _round(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool = False) -> Tensor:
    """Unchecked: the float codes of `w` on a given grid (torch.quantize_per_tensor's rounding)."""
    return linear._codes(w, scale, zero_point, *_qrange(bits, symmetric), "zero_point_first")


def _state(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int | None,
           w: Tensor, **extra) -> linear.QTensor:
    """A QTensor from float codes (rows, cols) and grids (rows, groups, 1); one group per row when
    group_size is None (then stored per channel, axis 0)."""
    rows, cols = w.shape
    q = codes.to(torch.int8 if symmetric else torch.uint8)
    if group_size is None:
        scale, zero, axis = scale.reshape(rows, 1), zero.reshape(rows, 1), 0
    else:
        scale, zero, axis = scale.reshape(rows, cols // group_size, 1), zero.reshape(rows, cols // group_size, 1), None
    return linear.QTensor(q, scale.float(), zero.float(), bits, symmetric, axis, group_size, w.shape, w.dtype,
                          **extra)


@torch.no_grad()
def quantize_rtn(w: Tensor, bits: int, group_size: int | None = None, *, symmetric: bool = False,
                 clip_ratio: float = 1.0) -> linear.QTensor:
    """Round-to-nearest, per output row or per group of `group_size` input features; returns the
    QTensor (`.dequantize()` gives w's shape and dtype). `clip_ratio` < 1 shrinks every grid's range."""
    check_args(w, bits, group_size)
    axis = 0 if group_size is None else None  # per output channel, or per group along the row
    return linear.quantize(w, bits, symmetric, axis, group_size, clip_ratio)
