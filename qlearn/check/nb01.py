"""Checkers for notebook 01 (number formats).

1.1 decode_bf16(fn):    fn(code: int) -> float, the value of a 16-bit bf16 bit pattern
1.2 fp16_ulp(fn):       fn(x: float) -> float, the spacing of fp16 values in the binade of x
1.3 round_to_bf16(fn):  fn(x: float32 Tensor) -> float32 Tensor, round to bf16 on the float32 bits
1.4 mx_exponent(fn):    fn(block: float32 Tensor, emax: int) -> int, the E8M0 shared exponent of an MX block:
                        X = floor(log2 max|block|) - emax, clamped to [-127, 127] (-127 for an all-zero block)
1.5 block_bits(fn):     fn(elem_bits, block_size, scale_bits, tensor_scale_bits=0, numel=None) -> float, bits
                        per element of a block-scaled format: b + s / B (+ t / N when numel is given)
"""

from __future__ import annotations

import math

import torch

from ..quant.state import bits_per_param as _bits_formula
from . import CheckResult, exercise

__all__ = ["block_bits", "decode_bf16", "fp16_ulp", "mx_exponent", "round_to_bf16"]

# (bit pattern, value): every bf16 value is exact in a Python float, so the comparison is exact.
_BF16_CASES = [
    (0x3F80, 1.0),                    # 0 01111111 0000000: exponent 127 - 127 = 0
    (0xC020, -2.5),                   # 1 10000000 0100000: -(1 + 32/128) * 2^1
    (0x4049, 3.140625),               # 0 10000000 1001001: pi in bf16
    (0x3DCD, 0.10009765625),          # 0.1 in bf16
    (0x7F7F, 3.3895313892515355e38),  # the largest finite bf16
    (0x0080, 2.0**-126),              # the smallest normal
    (0x0001, 2.0**-133),              # the smallest subnormal: (0 + 1/128) * 2^(1 - 127)
    (0x8040, -(2.0**-127)),           # a negative subnormal: -(0 + 64/128) * 2^-126
]


def decode_bf16(fn) -> CheckResult:
    """Exercise 1.1: decode bf16 bit patterns (sign 1, exponent 8 with bias 127, mantissa 7 bits)."""
    with exercise("1.1", "decode a bf16 bit pattern") as ex:
        for code, expected in _BF16_CASES:
            got = fn(code)
            if isinstance(got, torch.Tensor):
                ex.true(got.numel() == 1, f"decode_bf16(0x{code:04X}) should return one number, got a "
                        f"tensor of shape {tuple(got.shape)}")
                got = got.item()
            subnormal = (code >> 7) & 0xFF == 0
            hint = ("an exponent field of 0 means a subnormal: no implicit leading 1, and the exponent "
                    "is 1 - 127 = -126, not 0 - 127" if subnormal else
                    "value = (-1)^s * (1 + m/128) * 2^(e - 127) with s = code >> 15, e = (code >> 7) & 0xFF, "
                    "m = code & 0x7F (7 mantissa bits, so divide by 2^7)")
            ex.close(got, expected, what=f"decode_bf16(0x{code:04X})", atol=0.0, rtol=0.0, hint=hint)
    return ex.result


# (x, the spacing of fp16 values in x's binade); checked against torch's next fp16 in the tests.
_ULP_CASES = [
    (1.0, 2.0**-10),      # [1, 2): 10 mantissa bits
    (1.5, 2.0**-10),
    (1000.0, 0.5),        # [512, 1024): 2^(9 - 10)
    (2048.0, 2.0),        # [2048, 4096): integers are no longer all representable
    (65504.0, 32.0),      # the top binade [32768, 65536)
    (-3.0, 2.0**-9),      # the spacing is a distance: positive for negative x too
    (0.1, 2.0**-14),      # [1/16, 1/8): 2^(-4 - 10)
    (1e-6, 2.0**-24),     # below 2^-14: the subnormals keep the spacing 2^(-14 - 10)
]


def fp16_ulp(fn) -> CheckResult:
    """Exercise 1.2: the fp16 spacing (ulp) at x."""
    with exercise("1.2", "fp16 spacing (ulp) at a value") as ex:
        for x, expected in _ULP_CASES:
            got = fn(x)
            if isinstance(got, torch.Tensor):
                got = got.item()
            if abs(x) < 2.0**-14:
                hint = ("below the smallest normal 2^-14 the exponent stops at -14 (subnormals), so the "
                        "spacing stays 2^(-14 - 10) = 2^-24")
            elif x < 0:
                hint = "use |x|: a spacing is a distance, positive for negative x too"
            else:
                hint = ("find the binade e = floor(log2|x|) (math.frexp(x)[1] - 1), then the spacing is "
                        "2^(e - 10) because fp16 keeps 10 mantissa bits")
            ex.close(got, expected, what=f"fp16_ulp({x})", atol=0.0, rtol=0.0, hint=hint)
    return ex.result


def _bf16_cases() -> torch.Tensor:
    one = torch.tensor(1.0)
    ties = [1 + 2**-8, 1 + 3 * 2**-8, 256 + 1, 256 + 3, -(1 + 2**-8), -(1 + 3 * 2**-8)]  # exact ties
    near = [float(torch.nextafter(torch.tensor(t), 2 * one)) for t in ties[:2]]  # just above a tie
    return torch.tensor([1.0, 3.14159265, -0.1, 0.0, -0.0, 1e-40, 3.3e38, 65504.0, *ties, *near],
                        dtype=torch.float32)


def round_to_bf16(fn) -> CheckResult:
    """Exercise 1.3: round float32 to bf16 on the bits (round half to even), return float32."""
    with exercise("1.3", "round to bf16 by bit manipulation") as ex:
        x = _bf16_cases()
        expected = x.to(torch.bfloat16).float()  # torch's cast is the reference
        got = fn(x.clone())
        ex.tensor_like(got, expected, "round_to_bf16(x)")
        ex.equal(got.dtype, torch.float32, "the dtype of the result",
                 hint="return float32 (view the int32 bits back as torch.float32), not bfloat16")
        if not torch.equal(got.view(torch.int32), expected.view(torch.int32)):
            bits = x.view(torch.int32)
            truncated = (bits & -65536).view(torch.float32)
            half_up = ((bits + 0x8000) & -65536).view(torch.float32)
            if torch.equal(got, truncated):
                hint = ("you truncated (round toward zero); add 0x7FFF plus the lowest kept bit "
                        "((bits >> 16) & 1) before clearing the low 16 bits")
            elif torch.equal(got, half_up):
                hint = ("ties go up with + 0x8000; round half to even adds 0x7FFF + ((bits >> 16) & 1), so a "
                        "tie only rounds up when the kept part is odd")
            else:
                hint = ("view the float32 as int32, add 0x7FFF + ((bits >> 16) & 1), clear the low 16 bits "
                        "(& -65536), view back as float32")
            i = int((got.view(torch.int32) != expected.view(torch.int32)).nonzero()[0])
            ex.fail(f"round_to_bf16(x)[{i}] with x = {x[i].item():.9g}: expected {expected[i].item():.9g}, "
                    f"got {got[i].item():.9g}", hint)
    return ex.result


def _block(amax: float, negative_top: bool = False) -> torch.Tensor:
    """A block of 32 float32 values whose largest magnitude is `amax` (negative if `negative_top`), the rest
    smaller values of both signs (so that max(block) and max|block| differ when the top is negative)."""
    rest = torch.linspace(-0.5, 0.25, 31) * amax
    top = torch.tensor([-amax if negative_top else amax])
    return torch.cat([rest[:5], top, rest[5:]]).float()


_NEXT_BELOW = float(torch.nextafter(torch.tensor(2.0**-5), torch.tensor(0.0)))  # 2^-5 (1 - 2^-24), float32
# (block, emax, X): X = floor(log2 amax) - emax in [-127, 127]; checked against qlearn.formats.mx in the tests.
_MX_CASES = [
    (_block(1.0), 2, -2),               # E2M1 (emax 2): amax 1 = 2^0
    (_block(7.0), 2, 0),                # 7 lies in [4, 8) = [2^2, 2^3): floor(log2 7) = 2
    (_block(6.0), 2, 0),
    (_block(8.0), 2, 1),
    (_block(0.75), 2, -3),              # floor(log2 0.75) = -1
    (_block(7.5, negative_top=True), 2, 0),  # the largest magnitude is -7.5
    (_block(448.0), 8, 0),              # E4M3 (emax 8)
    (_block(1.0), 15, -15),             # E5M2 (emax 15)
    (torch.zeros(32), 2, -127),         # no log2: E8M0's smallest scale
    (_block(2.0**-130), 2, -127),       # a float32 subnormal amax: below E8M0's range, clamped
    (_block(_NEXT_BELOW), 2, -8),       # just below 2^-5: floor(log2) = -6, but float32 log2 rounds to -5
]


def _as_int(got):
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, (int, float)) or (isinstance(got, float) and not got.is_integer()):
        return None
    return int(got)


def mx_exponent(fn) -> CheckResult:
    """Exercise 1.4: the E8M0 shared exponent X = floor(log2 amax) - emax of an MX block, clamped to [-127, 127]."""
    with exercise("1.4", "the E8M0 scale of a block") as ex:
        for block, emax, expected in _MX_CASES:
            amax = block.abs().max().item()
            what = f"mx_exponent(block with max|x| = {amax:.9g}, emax={emax})"
            try:
                got = fn(block.clone(), emax)
            except (ValueError, ZeroDivisionError, OverflowError) as err:
                if amax == 0:
                    ex.fail(f"{what} raised {type(err).__name__}: {err}",
                            "an all-zero block has no log2 (it is -inf): return -127, E8M0's smallest exponent")
                raise
            x = _as_int(got)
            if x is None:
                ex.fail(f"{what}: expected the integer {expected}, got {got!r}",
                        "return an int: the exponent X of the scale 2^X, e.g. math.frexp(amax)[1] - 1 - emax")
            if x == expected:
                continue
            top = block.max().item()
            if amax == 0:
                hint = "an all-zero block has no log2: return -127, E8M0's smallest exponent"
            elif expected == -127 and x < -127:
                hint = "clamp X to E8M0's range [-127, 127]: max(-127, min(127, X))"
            elif x == expected + emax:
                hint = f"subtract the element's emax ({emax} here): X = floor(log2 amax) - emax"
            elif top != amax and x == math.floor(math.log2(top)) - emax:
                hint = "take the largest magnitude, block.abs().max(): this block's largest value is negative"
            elif amax == _NEXT_BELOW:
                hint = ("torch.log2 in float32 rounds log2 of a number just below 2^-5 to exactly -5; read the "
                        "exponent exactly with math.frexp(amax)[1] - 1 (or torch.frexp), or use math.log2 in float64")
            elif x == math.ceil(math.log2(amax)) - emax:
                hint = "round log2 amax down (floor), not up: 7 lies in [4, 8) = [2^2, 2^3), so floor(log2 7) = 2"
            else:
                hint = "X = floor(log2 amax) - emax with amax = block.abs().max(); math.frexp(amax)[1] - 1 is floor(log2 amax)"
            ex.fail(f"{what}: expected {expected}, got {x}", hint)
    return ex.result


# (elem_bits, block_size, scale_bits, tensor_scale_bits, numel, the format)
_BITS_CASES = [
    (4, 32, 8, 0, None, "MXFP4: E2M1 + an E8M0 scale per 32"),
    (6, 32, 8, 0, None, "MXFP6"),
    (8, 32, 8, 0, None, "MXFP8"),
    (4, 16, 8, 32, None, "NVFP4 without a tensor size (the tensor scale left out)"),
    (4, 16, 8, 32, 768 * 256, "NVFP4 of a 768 x 256 matrix: + 32 / N for the fp32 tensor scale"),
    (4, 64, 32, 0, None, "NF4: an fp32 absmax per 64"),
    (4, 32, 16, 0, None, "INT4: an fp16 scale per group of 32"),
    (8, 128 * 128, 32, 0, None, "DeepSeek-V3 FP8 weights: an fp32 scale per 128 x 128 block"),
]


def block_bits(fn) -> CheckResult:
    """Exercise 1.5: bits per element b + s / B (+ t / N with numel) of a block-scaled format."""
    with exercise("1.5", "bits per weight of a block format") as ex:
        for b, B, s, t, n, name in _BITS_CASES:
            expected = _bits_formula(b, B, scale_bits=s, tensor_bits=t, numel=n)  # the library's one formula
            args = f"block_bits({b}, {B}, {s}" + (f", tensor_scale_bits={t}" if t else "") + \
                   (f", numel={n}" if n else "") + ")"
            try:
                got = fn(b, B, s, t, n) if n is not None or t else fn(b, B, s)
            except TypeError as err:
                if n is None:
                    ex.fail(f"{args} for {name} raised TypeError: {err}",
                            "numel=None means the tensor's size is not given: leave the tensor scale out "
                            "(it adds tensor_scale_bits / numel only when numel is known)")
                raise
            try:
                g = float(got)
            except (TypeError, ValueError):
                ex.fail(f"{args} for {name}: expected a number, got {type(got).__name__}")
            slips = [
                (b + s, "a block's scale is shared by its block_size elements: add scale_bits / block_size, "
                        "not scale_bits"),
                (expected / 8, "answer in bits per element, not bytes"),
                (b + s / B, "when numel is given, add the tensor scale's share tensor_scale_bits / numel"),
                (b + s / B + t, "the tensor scale is shared by all numel elements: tensor_scale_bits / numel"),
            ]
            hint = next((h for v, h in slips if v != expected and math.isclose(g, v, rel_tol=1e-12)),
                        "bits per element = elem_bits + scale_bits / block_size (+ tensor_scale_bits / numel "
                        "when numel is given)")
            ex.close(g, expected, what=f"{args} for {name}", atol=0.0, rtol=1e-12,  # a sum of three floats
                     hint=hint)
    return ex.result
