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

and in both cases  x_hat = scale * (q - zero_point). Every x inside the grid's range comes back
within scale/2.

Two rounding rules, because torch itself has two (`rounding=` names which one a function follows):
- "zero_point_first": q = clamp(round(x * (1 / scale) + zero_point)), the zero point added *before*
  rounding, the multiply-add rounded once to float32 (torch's kernels use a fused multiply-add): the rule
  of torch.quantize_per_tensor / quantize_per_channel. `quantize` uses it, so its codes equal torch's bit
  for bit (measured on torch 2.13's x86 CPU kernels; tests/test_quant_linear.py checks it). torch 2.11's
  quantize_per_tensor rounded the tie below as "zero_point_after" does (measured on an H200 machine, CPU
  and CUDA): the rule at ties moves between releases, which is why qlearn names its own.
- "zero_point_after": q = clamp(round(x * (1 / scale)) + zero_point), the rule of
  torch.fake_quantize_per_tensor_affine / fake_quantize_per_channel_affine, which QAT (qlearn.quant.qat)
  follows, and so does `qat.convert` when it turns a trained layer into codes.
The two agree except at exact ties with an odd zero point, where they pick codes one apart
(half-to-even applies to the code in the first rule, to x / scale in the second): with scale 0.125,
zero point 3, x = 0.0625 gives round(0.5 + 3) = 4 but round(0.5) + 3 = 3. Other details:
- `round` is round-half-to-even (torch.round; torch's kernels use nearbyint); x / scale is computed as
  x * (1 / scale), as torch's kernels do (they differ in the last bit now and then: 4 codes in 10^6
  Gaussian values at scale 0.01);
- the scale is floored at SCALE_FLOOR = float32 eps (1.19e-7), the floor of torch.ao.quantization's
  observers, so an all-zero group gets a tiny scale and codes 0 (its values come back as exact zeros)
  instead of 0/0 = NaN. Scales and zero points equal those of MinMaxObserver / PerChannelMinMaxObserver
  (symmetric: dtype=qint8, quant_min=-127, quant_max=127; asymmetric: quint8).

Granularity: one (scale, zero point) per tensor (axis=None), per channel along `axis` (like
torch.quantize_per_channel's `axis`), or per group of `group_size` consecutive values along the
last dimension. `clip_ratio` < 1 shrinks the range (values outside are clamped): the trade-off
between rounding error and clipping error that `mse_clip_search` optimizes.

Building blocks for other quantizers: `qrange`, `compute_scale_zero_point`, `quantize_codes` (codes on
a given grid) and `dequantize_codes`. They validate their inputs; the inner loops of GPTQ, AWQ and HQQ
call the unchecked `_scale_zero_point` and `_codes` after validating once.

`QTensor` is the quantized state of every integer grid in qlearn (quantize, RTN, GPTQ, AWQ, HQQ and QAT's
convert): the codes, the scales and zero points, and the two extras a PTQ method may need, a column
order (GPTQ's act-order) and input-channel scales folded into the previous operator (AWQ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .state import QuantState, storage_bits

__all__ = [
    "ROUNDING",
    "SCALE_FLOOR",
    "QTensor",
    "compute_scale_zero_point",
    "dequantize_codes",
    "mse_clip_search",
    "qrange",
    "quantize",
    "quantize_codes",
]

SCALE_FLOOR = torch.finfo(torch.float32).eps  # torch.ao.quantization observers' floor on the scale
ROUNDING = ("zero_point_first", "zero_point_after")  # torch.quantize_per_tensor's rule, fake_quantize's rule


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes' range: [-(2^(b-1)-1), 2^(b-1)-1] symmetric, [0, 2^b-1] asymmetric."""
    _check_bits(bits)
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDING:
        raise ValueError(f"rounding must be one of {ROUNDING}, got {rounding!r}")


def _codes(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, rounding: str) -> Tensor:
    """Unchecked float codes clamp(round(...), qmin, qmax) by `rounding` (module docstring)."""
    inv_scale = 1.0 / scale.float()  # torch multiplies by the float32 reciprocal (module docstring)
    if rounding == "zero_point_after":
        return torch.clamp(torch.round(x.float() * inv_scale) + zero_point, qmin, qmax)
    # float32 * float32 is exact in float64, so one rounding to float32 after the add is torch's fused
    # multiply-add; with zero_point = 0 it is the plain float32 product
    y = (x.float().double() * inv_scale.double() + zero_point).float()
    return torch.clamp(torch.round(y), qmin, qmax)


def quantize_codes(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool = True,
                   rounding: str = "zero_point_first") -> Tensor:
    """Codes of x on a given grid, clamp(round(x * (1 / scale) + zero_point), qmin, qmax) (or, with
    rounding="zero_point_after", clamp(round(x * (1 / scale)) + zero_point, ...)); int8 when symmetric,
    uint8 otherwise; scale and zero_point broadcast against x."""
    qmin, qmax = qrange(bits, symmetric)
    _check_rounding(rounding)
    return _codes(x, scale, zero_point, qmin, qmax, rounding).to(torch.int8 if symmetric else torch.uint8)


def dequantize_codes(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """x_hat = (q - zero_point) * scale in float32 (the difference is an exact integer, as in torch)."""
    return (q.float() - zero_point) * scale


@dataclass(repr=False)
class QTensor(QuantState):
    """Integer codes plus everything needed to undo them (like bitsandbytes' packed data + QuantState).

        x_hat = scale * (q - zero_point)          per tensor, per channel along `axis`, or per group

    For per-group quantization `scale` and `zero_point` have shape (*shape[:-1], shape[-1] // group_size, 1)
    and broadcast against q viewed as (*shape[:-1], shape[-1] // group_size, group_size); per-channel
    they are 1 everywhere but along `axis`; per-tensor they are 0-d. Two optional extras for 2-D
    weights (out, in): `perm`, the order in which the columns were quantized and are stored (GPTQ's
    act-order; dequantize puts them back), and `input_scale`, per-input-channel scales s that the
    weight was multiplied by before quantizing (AWQ: the effective weight is x_hat / s, with 1 / s
    folded into the previous operator, so s costs no storage)."""

    q: Tensor  # integer codes, the input's shape (int8 symmetric, uint8 asymmetric)
    scale: Tensor  # float32
    zero_point: Tensor  # float32, same layout as scale (zeros when symmetric; HQQ's are not integers)
    bits: int
    symmetric: bool
    axis: int | None  # normalized to 0..ndim-1
    group_size: int | None
    shape: torch.Size
    dtype: torch.dtype
    scale_bits: int = 16  # storage of each scale (fp16, as RTN, GPTQ, AWQ, HQQ and GGUF keep them)
    zero_point_bits: int = 16  # storage of each zero point (GPTQ packs its integer zero points in `bits`)
    perm: Tensor | None = None  # (in,) column order of q and the groups (GPTQ act-order), else None
    input_scale: Tensor | None = None  # (in,) AWQ's scales s: the effective weight is x_hat / s

    def _values(self) -> Tensor:
        x_hat = dequantize_codes(_grouped(self.q, self.group_size), self.scale, self.zero_point)
        x_hat = x_hat.reshape(self.shape)
        if self.perm is not None:
            x_hat = x_hat[:, torch.argsort(self.perm)]  # columns back in their original order
        if self.input_scale is not None:
            x_hat = x_hat / self.input_scale
        return x_hat

    @property
    def granularity(self) -> str:
        if self.group_size is not None:
            return f"per-group({self.group_size})"
        return "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"

    def storage_bits(self) -> float:
        """bits per code + scale_bits per scale (+ zero_point_bits per zero point when asymmetric)
        + 32 per column for a stored order (GPTQ's g_idx); AWQ's folded scales cost nothing."""
        return storage_bits(self.q.numel(), self.bits, scales=self.scale.numel(), scale_bits=self.scale_bits,
                            zero_points=0 if self.symmetric else self.zero_point.numel(),
                            zero_point_bits=self.zero_point_bits,
                            tensor_bits=0 if self.perm is None else 32 * self.perm.numel())

    def _repr_fields(self) -> str:
        extra = ["symmetric" if self.symmetric else "asymmetric", f"scales={self.scale.numel()}"]
        if self.perm is not None:
            extra.append("act-order")
        if self.input_scale is not None:
            extra.append("input_scale")
        return ", ".join(extra)


def _grouped(x: Tensor, group_size: int | None) -> Tensor:
    """(..., n) -> (..., n // group_size, group_size); unchanged when group_size is None."""
    return x if group_size is None else x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _check(x: Tensor, bits: int, axis: int | None, group_size: int | None, clip_ratio: float) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float32, float16, bfloat16, float64), "
                        f"got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError("x must not be empty")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf: quantization needs finite values")
    _check_bits(bits)
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim()):
        raise ValueError(f"axis must be None or an int in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-D "
                         f"tensor, got {axis!r}")
    if group_size is not None:
        if axis is not None:
            raise ValueError("give either axis (per-channel) or group_size (per-group), not both")
        last = x.shape[-1] if x.dim() else None
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
                or last is None or last % group_size:
            raise ValueError(f"group_size must be a positive int dividing the last dimension "
                             f"({last}), got {group_size!r}")
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}")


def _reduce(t: Tensor, op, x_dim: int, axis: int | None, group_size: int | None) -> Tensor:
    """op (amin/amax) over what one scale covers, keeping dims so the result broadcasts against t."""
    if group_size is not None:
        return op(t, dim=-1, keepdim=True)  # t is grouped: (..., n // group_size, 1)
    if axis is None:
        return op(t)  # 0-d
    dims = tuple(d for d in range(x_dim) if d != axis % x_dim)
    return op(t, dim=dims, keepdim=True) if dims else t.clone()  # 1-D per-channel: one scale per value


def _scale_zero_point(xg: Tensor, bits: int, symmetric: bool, x_dim: int, axis: int | None,
                      group_size: int | None, clip_ratio: float = 1.0) -> tuple[Tensor, Tensor]:
    """Unchecked core of `compute_scale_zero_point` on the grouped view `xg` (float32)."""
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    # Step 1: the range each scale covers, stretched to hold 0, then shrunk by clip_ratio
    lo = _reduce(xg, torch.amin, x_dim, axis, group_size).clamp(max=0) * clip_ratio
    hi = _reduce(xg, torch.amax, x_dim, axis, group_size).clamp(min=0) * clip_ratio
    # Step 2: the step between levels, floored so that an all-zero group does not divide by 0
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=SCALE_FLOOR)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=SCALE_FLOOR)
    # Step 3: the code of 0 (torch's observers write it qmin - round(lo / scale), the same number)
    zero_point = torch.clamp(torch.round(-lo / scale), qmin, qmax)
    return scale, zero_point


def compute_scale_zero_point(x: Tensor, bits: int, symmetric: bool = True, axis: int | None = None,
                             group_size: int | None = None, clip_ratio: float = 1.0) -> tuple[Tensor, Tensor]:
    """(scale, zero_point), float32, by the formulas of the module docstring, shaped to broadcast
    against the grouped view of x (x itself unless group_size is given)."""
    _check(x, bits, axis, group_size, clip_ratio)
    return _scale_zero_point(_grouped(x.float(), group_size), bits, symmetric, x.dim(), axis, group_size,
                             clip_ratio)


def quantize(x: Tensor, bits: int = 8, symmetric: bool = True, axis: int | None = None,
             group_size: int | None = None, clip_ratio: float = 1.0) -> QTensor:
    """Quantize x to `bits`-bit integer codes with a scale and a zero point (module docstring), by
    torch.quantize_per_tensor's rounding rule ("zero_point_first").

    axis=None: per-tensor; axis=k: per-channel, one scale per index along dimension k;
    group_size=g: per-group, one scale per g consecutive values of the last dimension (g must divide it).
    """
    scale, zero_point = compute_scale_zero_point(x, bits, symmetric, axis, group_size, clip_ratio)
    q = quantize_codes(_grouped(x, group_size), scale, zero_point, bits, symmetric).reshape(x.shape)
    axis = None if axis is None else axis % x.dim()
    return QTensor(q, scale, zero_point, bits, symmetric, axis, group_size, x.shape, x.dtype)


def mse_clip_search(x: Tensor, bits: int, symmetric: bool = True, axis: int | None = None,
                    group_size: int | None = None, ratios: Tensor | None = None) -> tuple[float, Tensor, Tensor]:
    """The clip ratio in `ratios` (default 0.30, 0.31, ..., 1.00) that minimizes the mean squared
    error ||x - dequantize(quantize(x, clip_ratio=c))||^2 / n; returns (best ratio, ratios, errors).

    Clipping trades a larger error on the few values beyond the shrunk range for a finer grid (a
    smaller rounding error) on all the others; AWQ's clip search makes the same trade per group."""
    ratios = torch.linspace(0.3, 1.0, 71) if ratios is None else ratios
    errors = torch.stack([
        (quantize(x, bits, symmetric, axis, group_size, float(c)).dequantize().float() - x.float()).pow(2).mean()
        for c in ratios])
    return float(ratios[errors.argmin()]), ratios, errors
