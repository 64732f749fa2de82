"""Block-scaled floats from their definitions: OCP Microscaling (MXFP8, MXFP6, MXFP4) and NVIDIA's NVFP4.

MX (OCP Microscaling Formats v1.0, Sec. 5-6.3): the last dimension is cut into blocks of k = 32 values;
block b stores one E8M0 scale (8 bits, the power of two 2^(E - 127); E = 255 is NaN) and k elements of an
FP8, FP6 or FP4 format `elem`:

    X_b  = floor(log2 amax_b) - emax                     the shared exponent (the "floor" rule)
    q_i  = round_elem(clamp(x_i / 2^X_b, -max, max))     to nearest, ties to even (floats.encode)
    x̂_i  = q_i * 2^X_b

emax is the exponent of the element's largest power of two (MX_EMAX: fp4_e2m1 2, fp6_e2m3 2, fp6_e3m2 4,
fp8_e4m3 8, fp8_e5m2 15). The floor rule puts amax_b / 2^X_b in [2^emax, 2^(emax + 1)): for E2M1 in [4, 8),
but E2M1 stops at 6, so a block whose largest value lies in (6·2^X, 8·2^X) is clipped: those values
saturate to 6·2^X (`mx_clipped` finds such blocks). Every element format loses the top of that binade,
amax / 2^(X + emax) above max / 2^emax: 1.5 for E2M1, 1.875 for E2M3, 1.75 for E3M2, E4M3 and E5M2.

Other scale rules (`scale_rule=`, torchao's ScaleCalculationMode), X clamped to E8M0's [-127, 127]:
    "ceil"   X = ceil(log2 amax) - emax                never clips; can waste a binade
    "even"   X = floor(log2 round_M(amax)) - emax      amax first rounded (half up) to the element's M mantissa bits
    "rceil"  X = ceil(log2(amax / max))                NVIDIA's (cuBLAS): the smallest 2^X with amax / 2^X <= max

NVFP4 (NVIDIA): blocks of 16 E2M1 elements, each block with an FP8 E4M3 scale (a real number, not only a
power of two), and optionally one float32 scale t per tensor that moves the block scales into E4M3's range:

    t    = amax(x) / (448 · 6)                                (per_tensor_scale=True, as torchao sets it; else t = 1)
    s_b  = round_e4m3(clamp(amax_b / 6 / t, 2^-6, 448))
    q_i  = round_e2m1(clamp(x_i · ((1 / t) / s_b), -6, 6))
    x̂_i  = q_i · (t · s_b)

Storage (qlearn.quant.state's formula): MX b + 8/32 bits per value (MXFP4 4.25, MXFP6 6.25, MXFP8 8.25);
NVFP4 4 + 8/16 + 32/N = 4.5 + 32/N.

Bit for bit with torchao's `MXTensor.to_mx(...).dequantize()` and `NVFP4Tensor.to_nvfp4(...).dequantize()`
(tests/test_mx.py): the steps above are torchao's float32 operations in its order (every one exact or one
IEEE rounding, so any CPU gives the same bits), with torchao's corner case of the smallest E8M0 code kept:
a block with X = -127 (amax < 2^(emax - 126), below any real weight) is divided by 2^-126, float32's
smallest normal (a Triton workaround), but multiplied back by 2^-127 ("floor", "ceil", "even"), or not
scaled at all ("rceil"): it comes back halved, or as zeros. Where torchao differs and qlearn does not follow:
  - "rceil": torchao's CPU path takes ceil(log2(amax / max)) with a float32 log2, which rounds a quotient
    just above 2^k down to k; qlearn reads X from the quotient's bits, exactly (as NVIDIA's cvt.rp does).
  - NaN or inf input: torchao makes a block holding NaN all NaN, and a block holding inf into that inf and
    zeros; qlearn raises a ValueError (no silent NaN/inf).
  - NVFP4 with a tensor scale on an all-zero tensor: torchao divides by t = 0 (NaN); qlearn gives zeros.
    On a tensor so small that 1 / t overflows (amax < 2688 / 3.4e38 = 7.9e-36) torchao saturates every
    element; qlearn raises a ValueError.
torchao is optional here (`torchao_available()`); `torchao_mx`/`torchao_nvfp4` call its reference code.
Hardware: MXFP8/MXFP6/MXFP4 and NVFP4 matmuls run natively on Blackwell-class GPUs (compute capability 10.0+);
elsewhere they are emulated, as here.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..quant.state import QuantState, storage_bits
from .floats import _pow2, decode, encode, info, round_to

__all__ = ["MX_EMAX", "SCALE_RULES", "MXState", "mx_clipped", "quantize_mx", "quantize_nvfp4", "shared_exponent",
           "torchao_available", "torchao_mx", "torchao_nvfp4"]

MX_EMAX = {"fp4_e2m1": 2, "fp6_e2m3": 2, "fp6_e3m2": 4, "fp8_e4m3": 8, "fp8_e5m2": 15}  # elem: emax
SCALE_RULES = ("floor", "ceil", "even", "rceil")
E8M0_BIAS = 127
NVFP4_BLOCK = 16
E4M3_MAX, E4M3_TINY, E2M1_MAX = 448.0, 2.0**-6, 6.0  # the block scale stays a normal E4M3 number


def _check_x(x, block_size: int, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype (float32, bfloat16, float16, float64), "
                        f"got {x.dtype}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if x.dim() == 0 or x.shape[-1] % block_size:
        raise ValueError(f"block_size must divide the last dimension of {name} (shape {tuple(x.shape)}), "
                         f"got {block_size}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf, which block-scaled formats cannot hold (torchao turns "
                         f"such a block into NaN, or into the inf and zeros); replace them first")


def _check_elem(elem: str) -> None:
    if elem not in MX_EMAX:
        raise ValueError(f"elem must be one of {tuple(MX_EMAX)}, got {elem!r}")


@functools.cache
def _table(fmt: str) -> Tensor:
    """decode() of every bit pattern of `fmt` (at most 8 bits), so that decoding is one gather."""
    return decode(torch.arange(2 ** info(fmt).bits), fmt)


def decode_codes(codes: Tensor, fmt: str) -> Tensor:
    """floats.decode(codes, fmt) for uint8 codes, by table lookup (the same float32 values)."""
    return _table(fmt).to(codes.device)[codes.long()]


def _blocks(x: Tensor, block_size: int) -> Tensor:
    return x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)  # (..., nb, B)


def shared_exponent(amax: Tensor | float, elem: str = "fp4_e2m1", scale_rule: str = "floor") -> Tensor:
    """X (int32, clamped to [-127, 127]) of blocks whose largest magnitude is `amax` (float32), by `scale_rule`
    (module docstring): floor(log2 amax) - emax for "floor", read from amax's float32 exponent field."""
    _check_elem(elem)
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}")
    spec, emax = info(elem), MX_EMAX[elem]
    a = torch.as_tensor(amax).float()
    if scale_rule == "rceil":
        # Step 1: the quotient amax / max in float32; Step 2: ceil(log2 d) = e - 1 if d = 2^(e-1), else e,
        # with d = m·2^e, m in [0.5, 1) (frexp; exact, subnormals included); d = 0 gives the smallest scale.
        d = a / spec.max
        m, e = torch.frexp(d)
        x_exp = torch.where(m == 0.5, e - 1, e)
        x_exp = torch.where(d == 0, -E8M0_BIAS, x_exp)
    else:
        bits = a.view(torch.int32)
        if scale_rule == "even":  # round amax half up to M mantissa bits, keep only its exponent
            bits = (bits + (1 << (22 - spec.mantissa_bits))) & 0x7F800000
        # floor(log2 amax) from the exponent field (bias 127; a float32 subnormal or zero reads as -127)
        x_exp = ((bits >> 23) & 0xFF) - 127
        if scale_rule == "ceil":
            x_exp = x_exp + ((bits & 0x7FFFFF) > 0).to(x_exp.dtype)
        x_exp = x_exp - emax
    return x_exp.to(torch.int32).clamp(-E8M0_BIAS, E8M0_BIAS)


def mx_clipped(x: Tensor, elem: str = "fp4_e2m1", block_size: int = 32, scale_rule: str = "floor") -> Tensor:
    """Which blocks (bool, shape (..., n_blocks)) `scale_rule` clips: amax_b / 2^X_b > max(elem), so their
    largest values saturate. With "floor" and E2M1 these are the blocks whose amax lies in (6·2^X, 8·2^X)."""
    _check_x(x, block_size)
    amax = _blocks(x, block_size).abs().amax(-1)
    x_exp = shared_exponent(amax, elem, scale_rule)
    return amax.double() / _pow2(x_exp) > info(elem).max


@dataclass(repr=False)
class MXState(QuantState):
    """A block-scaled float tensor: element bit patterns `codes` (uint8, the tensor's shape), one scale code per
    block of `block_size` along the last dimension (`scales`, uint8: E8M0 for MX, E4M3 bit patterns for NVFP4)
    and NVFP4's optional float32 `tensor_scale`. dequantize: x̂ = decode(code) * scale value (module docstring)."""

    codes: Tensor               # uint8, the input's shape: bit patterns of `elem`
    scales: Tensor              # uint8, (..., n_blocks): E8M0 codes X + 127, or E4M3 bit patterns
    elem: str                   # element format, one of MX_EMAX
    block_size: int
    scale_format: str           # "e8m0" (MX) or "fp8_e4m3" (NVFP4)
    shape: torch.Size
    dtype: torch.dtype
    scale_rule: str | None = None      # MX only: one of SCALE_RULES
    tensor_scale: Tensor | None = None  # NVFP4 only: float32 t, or None

    def scale_values(self) -> Tensor:
        """What each block's elements are multiplied by (float32, shape (..., n_blocks)): 2^(E - 127) for
        E8M0; t · s_b (one float32 rounding, as torchao) for NVFP4."""
        if self.scale_format == "e8m0":
            return _pow2(self.scales.to(torch.int32) - E8M0_BIAS).float()
        s = decode_codes(self.scales, "fp8_e4m3")
        return s if self.tensor_scale is None else self.tensor_scale * s

    def _values(self) -> Tensor:
        q = decode_codes(self.codes, self.elem)  # exact element values, float32
        q = q.reshape(*self.shape[:-1], self.shape[-1] // self.block_size, self.block_size)  # (..., nb, B)
        return q * self.scale_values().unsqueeze(-1)

    def storage_bits(self) -> float:
        return storage_bits(self.numel, info(self.elem).bits, scales=self.scales.numel(), scale_bits=8,
                            tensor_bits=32 if self.tensor_scale is not None else 0)

    @property
    def bits(self) -> float:
        return info(self.elem).bits

    @property
    def granularity(self) -> str:
        extra = " + fp32 tensor scale" if self.tensor_scale is not None else ""
        return f"blocks of {self.block_size}, {self.scale_format} scales{extra}"

    def _repr_fields(self) -> str:
        rule = f", scale_rule={self.scale_rule!r}" if self.scale_rule else ""
        return f"elem={self.elem!r}{rule}"


def quantize_mx(x: Tensor, elem: str = "fp4_e2m1", block_size: int = 32, *, scale_rule: str = "floor") -> MXState:
    """MX-quantize `x` in blocks of `block_size` along its last dimension (module docstring):
    X = shared_exponent(amax_b), q_i = round_elem(clamp(x_i / 2^X, -max, max)), one E8M0 code X + 127 per block."""
    _check_elem(elem)
    _check_x(x, block_size)
    blocks = _blocks(x, block_size)  # (..., nb, B) float32
    # Step 1: each block's shared exponent.
    x_exp = shared_exponent(blocks.abs().amax(-1, keepdim=True), elem, scale_rule)  # (..., nb, 1)
    # Step 2: scale into the element's range, as torchao does it: "rceil" multiplies by 2^-X (by 1 for
    # the smallest code), the others divide by 2^X with 2^-127 raised to 2^-126 (module docstring).
    if scale_rule == "rceil":
        y = blocks * torch.where(x_exp == -E8M0_BIAS, 1.0, _pow2(-x_exp).float())
    else:
        y = blocks / _pow2(x_exp.clamp(min=-126)).float()
    # Step 3: saturate, round to nearest even, keep the bit patterns.
    spec = info(elem)
    codes = encode(y.clamp(-spec.max, spec.max), elem).to(torch.uint8).reshape(x.shape)
    scales = (x_exp.squeeze(-1) + E8M0_BIAS).to(torch.uint8)  # (..., nb) E8M0 codes
    return MXState(codes, scales, elem, block_size, "e8m0", x.shape, x.dtype, scale_rule=scale_rule)


def quantize_nvfp4(x: Tensor, per_tensor_scale: bool | float = True, *, block_size: int = NVFP4_BLOCK) -> MXState:
    """NVFP4-quantize `x` (module docstring): E2M1 elements, an E4M3 scale per `block_size` (16) values along
    the last dimension, and a float32 tensor scale t = amax / (448 · 6) when `per_tensor_scale` is True
    (a positive float is used as t itself, e.g. a calibrated one; False: no tensor scale)."""
    _check_x(x, block_size)
    if not (isinstance(per_tensor_scale, bool) or (isinstance(per_tensor_scale, (int, float))
                                                   and 0 < per_tensor_scale < float("inf"))):
        raise ValueError(f"per_tensor_scale must be True, False or a positive finite float, got {per_tensor_scale!r}")
    blocks = _blocks(x, block_size)  # (..., nb, B) float32
    # Step 1: each block's scale before rounding, amax_b / 6, and the tensor scale t.
    s = blocks.abs().amax(-1) / E2M1_MAX  # (..., nb)
    t = None
    if per_tensor_scale is True:
        t = x.detach().abs().amax().float() / (E4M3_MAX * E2M1_MAX)
    elif per_tensor_scale is not False:
        t = torch.tensor(float(per_tensor_scale), dtype=torch.float32, device=x.device)
    zero = t is not None and t == 0  # an all-zero tensor: torchao's 0 / 0 would be NaN
    if t is not None and not zero:
        if not torch.isfinite(1.0 / t):
            raise ValueError(f"x is too small for a tensor scale (t = {float(t):.3g}: 1 / t overflows float32, "
                             f"and torchao then saturates every element); use per_tensor_scale=False")
        s = s / t
    # Step 2: the block scales in E4M3 (kept normal: at least 2^-6).
    s8 = round_to(s.clamp(E4M3_TINY, E4M3_MAX), "fp8_e4m3")
    # Step 3: elements times the reciprocal of the combined scale (torchao's order), saturated, rounded.
    r = (1.0 / t) / s8 if t is not None and not zero else 1.0 / s8
    y = (blocks * r.unsqueeze(-1)).clamp(-E2M1_MAX, E2M1_MAX)
    codes = encode(y, "fp4_e2m1").to(torch.uint8).reshape(x.shape)
    scales = encode(s8, "fp8_e4m3").to(torch.uint8)
    return MXState(codes, scales, "fp4_e2m1", block_size, "fp8_e4m3", x.shape, x.dtype, tensor_scale=t)


# ------------------------------------------------------------------ torchao's reference, when installed

@functools.cache
def torchao_available() -> bool:
    """True when torchao's MX/NVFP4 reference code imports here (torchao is optional: Colab's torch and the
    GPU image may lack it, or carry a torchao built for another torch)."""
    try:
        importlib.import_module("torchao.prototype.mx_formats.mx_tensor")
        importlib.import_module("torchao.prototype.mx_formats.nvfp4_tensor")
    except (ImportError, RuntimeError, OSError, AttributeError):  # absent, or built for another torch
        return False
    return True


def _torchao(module: str):
    if not torchao_available():
        raise ImportError("torchao is not installed (or does not import with this torch): "
                          "pip install torchao, or skip the comparison with it")
    return importlib.import_module(f"torchao.prototype.mx_formats.{module}")


def torchao_mx(x: Tensor, elem: str = "fp4_e2m1", block_size: int = 32, scale_rule: str = "floor") -> Tensor:
    """torchao's `MXTensor.to_mx(x, elem dtype, block_size, scaling_mode).dequantize()` (float32 or bfloat16 x)."""
    _check_elem(elem)
    mx, config = _torchao("mx_tensor"), _torchao("config")
    dtype = {"fp4_e2m1": torch.float4_e2m1fn_x2, "fp8_e4m3": torch.float8_e4m3fn,
             "fp8_e5m2": torch.float8_e5m2}.get(elem, elem)  # torchao names the fp6 formats as qlearn does
    mode = config.ScaleCalculationMode(scale_rule)
    return mx.MXTensor.to_mx(x.contiguous(), dtype, block_size, scaling_mode=mode).dequantize(x.dtype)


def torchao_nvfp4(x: Tensor, per_tensor_scale: bool = True) -> Tensor:
    """torchao's `NVFP4Tensor.to_nvfp4(x, per_tensor_scale=amax / (448 · 6) or None).dequantize()`."""
    nv = _torchao("nvfp4_tensor")
    t = nv.per_tensor_amax_to_scale(x.abs().amax()) if per_tensor_scale else None
    return nv.NVFP4Tensor.to_nvfp4(x.contiguous(), per_tensor_scale=t).dequantize(x.dtype)
