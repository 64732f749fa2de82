"""Linear (uniform) quantization: a grid of 2^b evenly spaced levels, described by a scale and a zero point.

Symmetric (zero point 0, a restricted range so that the grid is symmetric around 0, as torch's
qint8 with `quant_min=-127` and most LLM weight quantizers use):

    scale = absmax / (2^(b-1) - 1)
    q     = clamp(round(x / scale), -(2^(b-1) - 1), 2^(b-1) - 1)          (int8 storage)

Asymmetric (min-max; the range always includes 0, as torch's observers do, so 0 is exact too):

    lo, hi     = min(min(x), 0), max(max(x), 0)
    scale      = (hi - lo) / (2^b - 1)
    zero_point = clamp(round(-lo / scale), 0, 2^b - 1)
    q          = clamp(round(x / scale) + zero_point, 0, 2^b - 1)          (uint8 storage)

and in both cases  x_hat = scale * (q - zero_point). `round` is round-half-to-even (torch.round),
the rounding of torch.quantize_per_tensor. Every x inside the grid's range comes back within scale/2.

Granularity: one (scale, zero point) per tensor (axis=None), per channel along `axis` (like
torch.quantize_per_channel's `axis`), or per group of `group_size` consecutive values along the
last dimension. `clip_ratio` < 1 shrinks the range (values outside are clamped): the trade-off
between rounding error and clipping error that `mse_clip_search` optimizes.
A group whose values are all 0 gets scale 1 (not 0/0 = NaN); its values come back as exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QTensor", "quantize", "compute_scale_zero_point", "mse_clip_search", "qrange"]


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes' range: [-(2^(b-1)-1), 2^(b-1)-1] symmetric, [0, 2^b-1] asymmetric."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


@dataclass
class QTensor:
    """Quantized data plus everything needed to undo it."""

    q: Tensor  # integer codes, the input's shape (int8 symmetric, uint8 asymmetric)
    scale: Tensor  # float32, broadcastable against the grouped view of q
    zero_point: Tensor  # same layout as scale (zeros when symmetric)
    bits: int
    symmetric: bool
    axis: int | None
    group_size: int | None
    shape: torch.Size
    dtype: torch.dtype

    def dequantize(self) -> Tensor:
        """x_hat = scale * (q - zero_point), in the original shape and dtype."""
        q = _grouped(self.q, self.group_size).float()
        x_hat = (q - self.zero_point) * self.scale
        return x_hat.reshape(self.shape).to(self.dtype)

    @property
    def granularity(self) -> str:
        if self.group_size is not None:
            return f"per-group({self.group_size})"
        return "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"

    def bits_per_param(self, scale_bits: int = 16) -> float:
        """Storage bits per value: b for the code, plus the scales (and zero points, if asymmetric)
        stored in `scale_bits` each, spread over the values they cover."""
        extra = self.scale.numel() * scale_bits * (1 if self.symmetric else 2)
        return self.bits + extra / self.q.numel()

    def __repr__(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (f"QTensor(bits={self.bits}, {kind}, {self.granularity}, shape={tuple(self.shape)}, "
                f"scales={self.scale.numel()}, dtype={self.dtype})")


def _grouped(x: Tensor, group_size: int | None) -> Tensor:
    """(..., n) -> (..., n // group_size, group_size); unchanged when group_size is None."""
    return x if group_size is None else x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _check(x: Tensor, bits: int, axis: int | None, group_size: int | None, clip_ratio: float) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError("x must not be empty")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf: quantization needs finite values")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim()):
        raise ValueError(f"axis must be None or an int in [{-x.dim()}, {x.dim() - 1}], got {axis!r}")
    if group_size is not None:
        if axis is not None:
            raise ValueError("give either axis (per-channel) or group_size (per-group), not both")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
                or x.shape[-1] % group_size:
            raise ValueError(f"group_size must be a positive int dividing the last dimension "
                             f"({x.shape[-1]}), got {group_size!r}")
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}")


def _reduce_dims(x: Tensor, axis: int | None, group_size: int | None) -> tuple[int, ...] | None:
    """Dimensions of the (grouped) tensor that one scale covers; None means all of them."""
    if group_size is not None:
        return (-1,)
    if axis is None:
        return None
    axis = axis % x.dim()
    return tuple(d for d in range(x.dim()) if d != axis)


def compute_scale_zero_point(x: Tensor, bits: int, symmetric: bool = True, axis: int | None = None,
                             group_size: int | None = None, clip_ratio: float = 1.0) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) by the formulas of the module docstring, shaped to broadcast against
    the grouped view of x (x itself unless group_size is given)."""
    _check(x, bits, axis, group_size, clip_ratio)
    xg = _grouped(x.float(), group_size)
    dims = _reduce_dims(x, axis, group_size)
    qmin, qmax = qrange(bits, symmetric)

    def reduce(t: Tensor, op) -> Tensor:
        return op(t) if dims is None else op(t, dim=dims, keepdim=True)

    if symmetric:
        absmax = reduce(xg.abs(), torch.amax) * clip_ratio
        scale = absmax / qmax
        zero_point = torch.zeros_like(scale)
    else:
        lo = reduce(xg, torch.amin).clamp(max=0) * clip_ratio
        hi = reduce(xg, torch.amax).clamp(min=0) * clip_ratio
        scale = (hi - lo) / (qmax - qmin)
        zero_point = torch.clamp(torch.round(-lo / torch.where(scale > 0, scale, 1.0)), qmin, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: no 0/0
    return scale, zero_point


def quantize(x: Tensor, bits: int = 8, symmetric: bool = True, axis: int | None = None,
             group_size: int | None = None, clip_ratio: float = 1.0) -> QTensor:
    """Quantize x to `bits`-bit integer codes with a scale and a zero point (module docstring)."""
    scale, zero_point = compute_scale_zero_point(x, bits, symmetric, axis, group_size, clip_ratio)
    qmin, qmax = qrange(bits, symmetric)
    xg = _grouped(x.float(), group_size)
    q = torch.clamp(torch.round(xg / scale) + zero_point, qmin, qmax)
    q = q.reshape(x.shape).to(torch.int8 if symmetric else torch.uint8)
    return QTensor(q, scale, zero_point, bits, symmetric, axis, group_size, x.shape, x.dtype)


def mse_clip_search(x: Tensor, bits: int, symmetric: bool = True, axis: int | None = None,
                    group_size: int | None = None, ratios: Tensor | None = None) -> tuple[float, Tensor, Tensor]:
    """The clip ratio in `ratios` (default 0.30, 0.31, ..., 1.00) that minimizes the mean squared
    error ||x - dequantize(quantize(x, clip_ratio=c))||^2 / n; returns (best ratio, ratios, errors)."""
    ratios = torch.linspace(0.3, 1.0, 71) if ratios is None else ratios
    errors = torch.stack([
        (quantize(x, bits, symmetric, axis, group_size, float(c)).dequantize().float() - x.float()).pow(2).mean()
        for c in ratios])
    return float(ratios[errors.argmin()]), ratios, errors
