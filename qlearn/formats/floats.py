"""Floating-point and integer number formats, built from their bit fields (fp6 E2M3/E3M2 included).

A float format with E exponent bits, M mantissa bits and exponent bias b stores a sign s, an exponent
field e and a mantissa field m, and means

    normal     (e > 0):  (-1)^s * (1 + m / 2^M) * 2^(e - b)
    subnormal  (e = 0):  (-1)^s * (m / 2^M) * 2^(1 - b)

so within one binade [2^k, 2^(k+1)) the values are evenly spaced by ulp = 2^(k - M), and below the
smallest normal 2^(1 - b) the spacing stays 2^(1 - b - M) (the subnormals). Rounding x to the format
is therefore: take k from x's own exponent field, clamp it to k >= 1 - b, and round x / 2^(k - M) to
an integer, ties to even. That is all `round_to` does; no cast to the target dtype is used.

Special values and out-of-range inputs (as torch 2.13's own casts do, checked in the tests):
    fp32, fp16, bf16, fp8_e5m2  IEEE style: exponent field all ones is inf (m = 0) or NaN (m != 0);
                                a value that rounds above max becomes +-inf; NaN stays NaN.
    fp8_e4m3 (torch float8_e4m3fn, OCP "E4M3"): no inf; only S.1111.111 is NaN, so max is 448.
                                torch 2.13 saturates: every |x| > 448 and +-inf become +-448
                                (older torch releases gave NaN); NaN stays NaN.
    fp4_e2m1 (OCP MX "FP4"): values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, no inf and no NaN encoding.
                                Overflow and +-inf saturate to +-6 (the saturating conversion MX
                                implementations use, e.g. MLX's fp4_e2m1); NaN input is an error.
                                torch 2.13 has the dtype (float4_e2m1fn_x2) but no cast to it.
    fp6_e2m3, fp6_e3m2 (OCP MX "FP6", FP6_FORMATS): like fp4_e2m1, every bit pattern is a number;
                                max 7.5 (E2M3, bias 1) and 28 (E3M2, bias 3); overflow saturates, NaN
                                is an error. torch has no dtype for them (torchao's MX code stores
                                them in uint8: qlearn.formats.mx checks round_to against it).
                                They are MX element formats, kept out of FLOAT_FORMATS (notebook 01's
                                table of formats); round_to, encode, decode, bits, info and values
                                accept them.
    int8, int4                  two's complement integers; `info` and `values` only (an integer
                                grid needs a scale: see qlearn.quant.quantize).
Inputs are converted to float32 first (exact for fp16/bf16/fp8 input; for float64 input that is the
same double rounding torch's own casts do). Results come back as float32 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "FLOAT_FORMATS",
    "FORMATS",
    "FP6_FORMATS",
    "INT_FORMATS",
    "FloatBits",
    "FormatInfo",
    "bits",
    "decode",
    "encode",
    "info",
    "round_to",
    "values",
]

FLOAT_FORMATS = ("fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1")
INT_FORMATS = ("int8", "int4")
FORMATS = FLOAT_FORMATS + INT_FORMATS
FP6_FORMATS = ("fp6_e2m3", "fp6_e3m2")  # MX element formats (module docstring)
_FLOATS = FLOAT_FORMATS + FP6_FORMATS    # every float format round_to, encode and decode accept


@dataclass(frozen=True)
class FormatInfo:
    """Range and precision of one format (the names follow torch.finfo where it has the format)."""

    name: str
    bits: int                         # storage bits per value
    max: float                        # largest finite value
    min: float                        # most negative finite value
    eps: float                        # distance from 1 to the next larger value
    exponent_bits: int | None = None  # None for integer formats
    mantissa_bits: int | None = None
    bias: int | None = None
    smallest_normal: float | None = None     # 2^(1 - bias)
    smallest_subnormal: float | None = None  # 2^(1 - bias - mantissa_bits)
    has_inf: bool = False
    has_nan: bool = False
    overflow: str = "saturate"        # what a too-large value becomes: "inf" or "saturate" (to +-max)
    torch_dtype: torch.dtype | None = None  # torch's dtype for the same format, if torch has a cast

    @property
    def bytes_per_param(self) -> float:
        return self.bits / 8

    @property
    def is_float(self) -> bool:
        return self.exponent_bits is not None


def _float_info(name, e_bits, m_bits, ieee, dtype):
    bias = 2 ** (e_bits - 1) - 1
    if ieee:  # the all-ones exponent field is inf/NaN; the largest normal uses the field below it
        top, top_m = 2**e_bits - 2, 2**m_bits - 1
    elif name == "fp8_e4m3":  # only S.1111.111 is NaN: the top binade keeps mantissas 0..6
        top, top_m = 2**e_bits - 1, 2**m_bits - 2
    else:  # fp4_e2m1, fp6_e2m3, fp6_e3m2: every bit pattern is a number
        top, top_m = 2**e_bits - 1, 2**m_bits - 1
    largest = (1 + top_m / 2**m_bits) * 2.0 ** (top - bias)
    return FormatInfo(name, 1 + e_bits + m_bits, largest, -largest, 2.0**-m_bits, e_bits, m_bits, bias,
                      2.0 ** (1 - bias), 2.0 ** (1 - bias - m_bits), has_inf=ieee,
                      has_nan=ieee or name == "fp8_e4m3", overflow="inf" if ieee else "saturate",
                      torch_dtype=dtype)


_INFO = {
    "fp32": _float_info("fp32", 8, 23, True, torch.float32),
    "fp16": _float_info("fp16", 5, 10, True, torch.float16),
    "bf16": _float_info("bf16", 8, 7, True, torch.bfloat16),
    "fp8_e4m3": _float_info("fp8_e4m3", 4, 3, False, torch.float8_e4m3fn),
    "fp8_e5m2": _float_info("fp8_e5m2", 5, 2, True, torch.float8_e5m2),
    # torch.float4_e2m1fn_x2 packs two values per byte and has no cast from float: nothing to compare with
    "fp4_e2m1": _float_info("fp4_e2m1", 2, 1, False, None),
    "fp6_e2m3": _float_info("fp6_e2m3", 2, 3, False, None),
    "fp6_e3m2": _float_info("fp6_e3m2", 3, 2, False, None),
    "int8": FormatInfo("int8", 8, 127.0, -128.0, 1.0, torch_dtype=torch.int8),
    "int4": FormatInfo("int4", 4, 7.0, -8.0, 1.0),
}


def _check_fmt(fmt, allowed=FORMATS, why: str = "") -> FormatInfo:
    if fmt not in allowed:
        raise ValueError(f"fmt must be one of {allowed}{why}, got {fmt!r}")
    return _INFO[fmt]


def info(fmt: str) -> FormatInfo:
    """Max, min, eps, smallest normal/subnormal, field widths and bias of `fmt` (FORMATS or FP6_FORMATS)."""
    return _check_fmt(fmt, FORMATS + FP6_FORMATS)


def _to_float32(x, name: str = "x") -> torch.Tensor:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.tensor(float(x), dtype=torch.float32)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a floating-point torch.Tensor or a Python number, "
                        f"got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype (float16, bfloat16, float32, float64, "
                        f"float8_*), got {x.dtype}")
    return x.detach().to(torch.float32)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k for integer k in [-1022, 1023], exactly, as float64 built from its exponent field."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def round_to(x: torch.Tensor | float, fmt: str) -> torch.Tensor:
    """`x` rounded to the nearest value of float format `fmt` (ties to even), as a float32 tensor.

    value = round_half_even(x / 2^(k - M)) * 2^(k - M), with k = max(exponent of x, 1 - bias);
    then overflow per the format (module docstring): +-inf for IEEE-style formats, +-max otherwise.
    """
    spec = _check_fmt(fmt, _FLOATS, " (integer formats need a scale: see qlearn.quant.quantize)")
    x32 = _to_float32(x)
    if fmt == "fp32":
        return x32.clone()
    if not spec.has_nan and torch.isnan(x32).any():  # fp4_e2m1 and the fp6 formats
        raise ValueError(f"x contains NaN, which {fmt} cannot represent (it has no NaN encoding)")
    # Step 1: the exponent k of each |x|, read from its float32 bit fields (bias 127; float32
    # subnormals have field 0, i.e. k = -127, below every target's smallest normal anyway).
    k = ((x32.view(torch.int32) >> 23) & 0xFF) - 127
    # Step 2: below the smallest normal 2^(1 - bias) the subnormals keep that binade's spacing.
    k = k.clamp(min=1 - spec.bias)
    # Step 3: the spacing (ulp) of fmt's values in that binade, exactly, as a power of two.
    ulp = _pow2(k - spec.mantissa_bits)
    # Step 4: round to an integer multiple of ulp, ties to even (torch.round is round-half-even).
    # float64 keeps every step exact: x / ulp is a power-of-two rescaling of a float32.
    y = torch.round(x32.double() / ulp) * ulp
    # Step 5: out of range. IEEE-style formats overflow to +-inf; E4M3, E2M1 and FP6 saturate to +-max.
    if spec.overflow == "inf":
        y = torch.where(y.abs() > spec.max, torch.copysign(torch.tensor(math.inf, dtype=y.dtype), y), y)
    else:
        y = y.clamp(-spec.max, spec.max)  # clamp keeps NaN (E4M3's NaN stays NaN, as in torch)
    return y.to(torch.float32)  # exact: every value of fmt is a float32


def _fields(code: torch.Tensor, spec: FormatInfo):
    e_bits, m_bits = spec.exponent_bits, spec.mantissa_bits
    s = (code >> (e_bits + m_bits)) & 1
    e = (code >> m_bits) & (2**e_bits - 1)
    m = code & (2**m_bits - 1)
    return s, e, m


def decode(code: torch.Tensor | int, fmt: str) -> torch.Tensor:
    """The float32 values of integer bit patterns `code` of float format `fmt` (formula above)."""
    spec = _check_fmt(fmt, _FLOATS)
    if isinstance(code, int) and not isinstance(code, bool):
        code = torch.tensor(code)
    if not isinstance(code, torch.Tensor) or code.is_floating_point() or code.dtype == torch.bool:
        raise TypeError(f"code must be an int or an integer tensor of bit patterns, got {code!r:.60}")
    code = code.to(torch.int64)
    if ((code < 0) | (code >= 2**spec.bits)).any():
        raise ValueError(f"code must be in 0..{2**spec.bits - 1} for {fmt} ({spec.bits} bits)")
    s, e, m = _fields(code, spec)
    M, emin = spec.mantissa_bits, 1 - spec.bias
    # Step 1: the integer significand (implicit leading 1 only for normals) and its power of two.
    significand = torch.where(e > 0, m + 2**M, m)
    y = significand.double() * _pow2(torch.where(e > 0, e - spec.bias, emin) - M)
    # Step 2: special bit patterns.
    top = e == 2**spec.exponent_bits - 1
    if spec.has_inf:
        y = torch.where(top & (m == 0), math.inf, y)
        y = torch.where(top & (m != 0), math.nan, y)
    elif spec.has_nan:  # fp8_e4m3: only the all-ones pattern is NaN
        y = torch.where(top & (m == 2**M - 1), math.nan, y)
    return torch.where(s == 1, -y, y).to(torch.float32)


def encode(x: torch.Tensor | float, fmt: str) -> torch.Tensor:
    """The bit patterns (int64) of `round_to(x, fmt)`: sign, exponent and mantissa fields packed."""
    spec = _check_fmt(fmt, _FLOATS)
    y = round_to(x, fmt)
    E, M, bias = spec.exponent_bits, spec.mantissa_bits, spec.bias
    a = y.abs().double()
    # Step 1: the exponent field: biased exponent for normals, 0 for subnormals and zero.
    k = ((y.view(torch.int32) >> 23) & 0xFF).to(torch.int64) - 127
    normal = a >= spec.smallest_normal
    e = torch.where(normal, k + bias, 0)
    # Step 2: the mantissa field: the significand without its implicit 1, in units of ulp.
    ulp_exp = torch.where(normal, k, 1 - bias) - M
    m = torch.where(normal, a / _pow2(ulp_exp) - 2**M, a / _pow2(ulp_exp))
    # Step 3: the special values.
    special = ~torch.isfinite(a)
    m = torch.where(special, 0, m).to(torch.int64)
    e = torch.where(special, 2**E - 1, e)
    if spec.has_nan:  # quiet NaN: top mantissa bit for IEEE formats, all ones for E4M3
        m = torch.where(torch.isnan(a), 2 ** (M - 1) if spec.has_inf else 2**M - 1, m)
    s = torch.signbit(y).to(torch.int64)
    return (s << (E + M)) | (e << M) | m


def values(fmt: str) -> torch.Tensor:
    """Every finite value of a format of at most 8 bits, sorted, one zero, as a float32 tensor."""
    small = ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1", *FP6_FORMATS, "int8", "int4")
    spec = _check_fmt(fmt, small, " (formats of at most 8 bits)")
    if not spec.is_float:
        return torch.arange(int(spec.min), int(spec.max) + 1, dtype=torch.float32)
    v = decode(torch.arange(2**spec.bits), fmt)
    return torch.unique(v[torch.isfinite(v)])  # unique: +0 and -0 are one value; sorted


@dataclass(frozen=True)
class FloatBits:
    """The fields of one value of a float format, for the visualizer."""

    fmt: str
    sign: int
    exponent: int     # the stored (biased) exponent field
    mantissa: int     # the stored mantissa field (without the implicit leading 1)
    code: int         # the whole bit pattern as an unsigned integer
    binary: str       # "s eeeee mmmmmmmmmm"
    value: float      # what the pattern means (= round_to(x, fmt))
    kind: str         # "zero", "subnormal", "normal", "inf" or "nan"

    def formula(self) -> str:
        """The value as the format's formula with its integer fields, e.g. "+(1 + 512/1024) * 2^(15 - 15)"."""
        spec = _INFO[self.fmt]
        sign = "-" if self.sign else "+"
        if self.kind in ("inf", "nan"):
            return f"{sign}inf" if self.kind == "inf" else "NaN"
        lead, e = (1, self.exponent) if self.kind == "normal" else (0, 1)
        return f"{sign}({lead} + {self.mantissa}/{2**spec.mantissa_bits}) * 2^({e} - {spec.bias})"

    def __str__(self) -> str:
        return f"{self.fmt}: {self.binary} = {self.formula()} = {self.value:.8g}"


def bits(x: torch.Tensor | float, fmt: str) -> FloatBits:
    """Sign, exponent and mantissa fields of the single value `x` rounded to float format `fmt`."""
    spec = _check_fmt(fmt, _FLOATS)
    x32 = _to_float32(x)
    if x32.numel() != 1:
        raise ValueError(f"x must hold a single value, got shape {tuple(x32.shape)}")
    code = int(encode(x32.reshape(()), fmt))
    s, e, m = (int(t) for t in _fields(torch.tensor(code), spec))
    value = float(decode(code, fmt))
    if math.isnan(value):
        kind = "nan"
    elif math.isinf(value):
        kind = "inf"
    elif value == 0:
        kind = "zero"
    else:
        kind = "subnormal" if e == 0 else "normal"
    binary = f"{s} {e:0{spec.exponent_bits}b} {m:0{spec.mantissa_bits}b}"
    return FloatBits(fmt, s, e, m, code, binary, value, kind)
