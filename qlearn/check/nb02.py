"""Checkers for notebook 02 (linear quantization).

2.1 symmetric_scale(fn):    fn(x: Tensor, bits: int) -> scale of the restricted grid, absmax / (2^(bits-1) - 1)
2.2 asymmetric_params(fn):  fn(x: Tensor, bits: int) -> (scale, zero_point) of a min-max grid holding 0
2.3 pack_4bit(fn):          fn(codes: uint8 Tensor) -> uint8 Tensor, two codes per byte, first in the high nibble
2.4 bits_per_param(fn):     fn(bits, group_size, symmetric, zero_point_bits=16) -> storage bits per weight:
                            bits + (16 + (zero_point_bits if asymmetric)) / group_size
"""

from __future__ import annotations

import torch

from . import CheckResult, exercise

__all__ = ["asymmetric_params", "bits_per_param", "pack_4bit", "symmetric_scale"]


def _number(got, what: str, ex) -> float:
    if isinstance(got, torch.Tensor):
        ex.true(got.numel() == 1, f"{what} should be one number, got a tensor of shape {tuple(got.shape)}",
                "reduce over the whole tensor (x.abs().max()), not elementwise")
        got = got.item()
    return got


# (x, bits, expected scale): absmax / (2^(bits-1) - 1), computed in float64 here
_SYM_CASES = [
    ([-2.0, 1.0], 8, 2.0 / 127),
    ([0.5, -3.0, 2.0, 0.0], 4, 3.0 / 7),
    ([0.25, -0.75, 0.5], 2, 0.75 / 1),
    ([0.1, 0.4, 0.2], 3, 0.4 / 3),
]


def symmetric_scale(fn) -> CheckResult:
    """Exercise 2.1: the scale of a symmetric (restricted-range) grid."""
    with exercise("2.1", "symmetric scale") as ex:
        for x, bits, expected in _SYM_CASES:
            t = torch.tensor(x)
            got = _number(fn(t.clone(), bits), f"symmetric_scale({x}, bits={bits})", ex)
            absmax = max(abs(v) for v in x)
            if isinstance(got, (int, float)) and abs(got - absmax / 2 ** (bits - 1)) < 1e-9:
                hint = (f"you divided by 2^(bits-1) = {2 ** (bits - 1)}; the restricted symmetric range "
                        f"has {2 ** (bits - 1) - 1} levels on each side, so divide by 2^(bits-1) - 1")
            elif isinstance(got, (int, float)) and abs(got - 2 * absmax / (2**bits - 1)) < 1e-9:
                hint = ("2 * absmax / (2^bits - 1) is the full grid's scale (GPTQ's, codes -2^(bits-1) .. "
                        "2^(bits-1) - 1); this exercise asks for the restricted grid, absmax / (2^(bits-1) - 1)")
            elif isinstance(got, (int, float)) and abs(got - absmax / (2**bits - 1)) < 1e-9:
                hint = "2^bits - 1 levels is the asymmetric range; a symmetric grid divides by 2^(bits-1) - 1"
            elif isinstance(got, (int, float)) and abs(got - max(x) / (2 ** (bits - 1) - 1)) < 1e-9:
                hint = "use the largest |x| (x.abs().max()), not the largest x: negative values count too"
            else:
                hint = "scale = x.abs().max() / (2 ** (bits - 1) - 1)"
            # float32 absmax / float32 division: within 1e-6 relative of the float64 value
            ex.close(got, expected, what=f"symmetric_scale({x}, bits={bits})", atol=0.0, rtol=1e-6, hint=hint)
    return ex.result


# (x, bits, expected scale, expected zero point)
_ASYM_CASES = [
    ([-1.0, 0.0, 2.0, 3.0], 8, 4.0 / 255, 64),  # -min/scale = 63.75 -> 64
    ([-0.3, 1.2], 4, 1.5 / 15, 3),              # 0.3 / 0.1 = 3
    ([0.5, 2.0, 1.0], 8, 2.0 / 255, 0),         # all positive: the range is stretched down to 0
    ([-4.0, -1.0], 2, 4.0 / 3, 3),              # all negative: the range is stretched up to 0
]


def asymmetric_params(fn) -> CheckResult:
    """Exercise 2.2: scale and zero point of an asymmetric (min-max) grid whose range includes 0."""
    with exercise("2.2", "asymmetric scale and zero point") as ex:
        for x, bits, scale, zero_point in _ASYM_CASES:
            what = f"asymmetric_params({x}, bits={bits})"
            got = fn(torch.tensor(x), bits)
            ex.true(isinstance(got, (tuple, list)) and len(got) == 2, f"{what} should return (scale, zero_point), "
                    f"got {type(got).__name__}", "return scale, zero_point")
            got_scale, got_zp = _number(got[0], f"{what}'s scale", ex), _number(got[1], f"{what}'s zero point", ex)
            lo, hi = min(x), max(x)
            if min(lo, 0.0) != lo or max(hi, 0.0) != hi:
                hint = ("stretch the range to hold 0 first: lo = min(x.min(), 0), hi = max(x.max(), 0), so 0 "
                        "gets an exact code (that code is the zero point)")
            else:
                hint = "scale = (max - min) / (2 ** bits - 1): 2^bits levels have 2^bits - 1 gaps"
            ex.close(got_scale, scale, what=f"{what}'s scale", atol=0.0, rtol=1e-6, hint=hint)  # float32
            if isinstance(got_zp, float) and not float(got_zp).is_integer():
                ex.fail(f"{what}'s zero point: expected the integer {zero_point}, got {got_zp:.6g}",
                        "round it: the zero point is the integer code of 0, round(-min / scale)")
            hint = ("the zero point is round(-min / scale) with min <= 0, so it is >= 0; check the sign"
                    if got_zp == -zero_point and zero_point else
                    "zero_point = round(-min / scale), where min = min(x.min(), 0)")
            ex.equal(int(got_zp), zero_point, what=f"{what}'s zero point", hint=hint)
    return ex.result


def pack_4bit(fn) -> CheckResult:
    """Exercise 2.3: pack pairs of 4-bit codes into bytes, the first code in the high nibble."""
    from ..quant.packing import pack

    with exercise("2.3", "pack two 4-bit codes per byte") as ex:
        g = torch.Generator().manual_seed(2)
        cases = [torch.tensor([1, 10]), torch.tensor([15, 0, 0, 15, 7, 8]),
                 torch.randint(0, 16, (64,), generator=g)]
        for codes in cases:
            codes = codes.to(torch.uint8)
            expected = pack(codes, 4)
            got = fn(codes.clone())
            what = f"pack_4bit({codes.tolist() if codes.numel() <= 8 else 'random 64 codes'})"
            ex.tensor_like(got, expected, what, hint="two codes make one byte: the result has half as many elements")
            ex.equal(got.dtype, torch.uint8, f"{what}'s dtype", hint="return .to(torch.uint8)")
            if not torch.equal(got, expected):
                swapped = (codes[1::2] << 4) | codes[::2]
                hint = ("you put the first code in the low nibble; bitsandbytes (and this course) put it in the "
                        "high nibble: (codes[0::2] << 4) | codes[1::2]" if torch.equal(got, swapped) else
                        "byte = (first << 4) | second, i.e. (codes[0::2] << 4) | codes[1::2]")
                ex.equal(got, expected, what, hint=hint)
    return ex.result


# (bits, group_size, symmetric, zero_point_bits or None for the default 16, expected):
# bits + (16 [+ zero_point_bits]) / group_size; 4 + (16 + 4) / 128 = 4.15625 is GPTQ's packed format
_BPP_CASES = [
    (4, 128, True, None, 4 + 16 / 128),
    (4, 64, False, None, 4 + 32 / 64),
    (3, 32, True, None, 3 + 16 / 32),
    (2, 16, False, None, 2 + 32 / 16),
    (4, 128, False, 4, 4 + (16 + 4) / 128),
    (3, 64, True, 3, 3 + 16 / 64),  # symmetric: no zero point stored, whatever its width
]


def bits_per_param(fn) -> CheckResult:
    """Exercise 2.4: storage bits per weight of per-group quantization (fp16 scale, zero point of
    zero_point_bits bits when asymmetric)."""
    with exercise("2.4", "bits per parameter with group scales") as ex:
        for bits, group_size, symmetric, zero_point_bits, expected in _BPP_CASES:
            if zero_point_bits is None:
                what = f"bits_per_param({bits}, {group_size}, symmetric={symmetric})"
                got = fn(bits, group_size, symmetric)
            else:
                what = f"bits_per_param({bits}, {group_size}, symmetric={symmetric}, zero_point_bits={zero_point_bits})"
                got = fn(bits, group_size, symmetric, zero_point_bits=zero_point_bits)
            if isinstance(got, torch.Tensor):
                got = got.item()
            zp = 16 if zero_point_bits is None else zero_point_bits
            if got == bits + 16 / group_size and not symmetric:
                hint = f"an asymmetric group also stores its zero point: {zp} more bits per group"
            elif got == bits + (16 + zp) / group_size and symmetric:
                hint = "a symmetric group has no zero point to store: only its fp16 scale"
            elif zero_point_bits is not None and got == bits + 32 / group_size:
                hint = ("the zero point takes zero_point_bits bits, not always 16: integer zero points packed "
                        "in 4 bits (GPTQ) cost 4 per group")
            else:
                hint = ("bits per weight + (16 for the scale, + zero_point_bits for the zero point if "
                        "asymmetric) / group_size")
            ex.close(got, expected, what=what, atol=1e-12, rtol=0.0, hint=hint)
    return ex.result
