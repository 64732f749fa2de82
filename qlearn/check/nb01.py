"""Checkers for notebook 01 (number formats).

1.1 decode_bf16(fn):    fn(code: int) -> float, the value of a 16-bit bf16 bit pattern
1.2 fp16_ulp(fn):       fn(x: float) -> float, the spacing of fp16 values in the binade of x
1.3 round_to_bf16(fn):  fn(x: float32 Tensor) -> float32 Tensor, round to bf16 on the float32 bits
"""

from __future__ import annotations

import torch

from . import CheckResult, exercise

__all__ = ["decode_bf16", "fp16_ulp", "round_to_bf16"]

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
