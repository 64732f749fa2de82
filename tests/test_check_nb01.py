"""The notebook 01 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted."""

import math

import pytest
import torch

from qlearn import formats, memory
from qlearn.check import nb01
from qlearn.formats import mx


def decode_bf16(code: int) -> float:
    s, e, m = code >> 15, (code >> 7) & 0xFF, code & 0x7F
    if e == 0:
        return (-1) ** s * (m / 128) * 2.0**-126
    return (-1) ** s * (1 + m / 128) * 2.0 ** (e - 127)


def decode_bf16_no_subnormals(code: int) -> float:  # the usual mistake: an implicit 1 everywhere
    s, e, m = code >> 15, (code >> 7) & 0xFF, code & 0x7F
    return (-1) ** s * (1 + m / 128) * 2.0 ** (e - 127)


def fp16_ulp(x: float) -> float:
    e = max(math.frexp(abs(x))[1] - 1, -14)
    return 2.0 ** (e - 10)


def fp16_ulp_no_subnormals(x: float) -> float:
    return 2.0 ** (math.frexp(abs(x))[1] - 1 - 10)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    bits = x.view(torch.int32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.view(torch.float32)


def truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) & -65536).view(torch.float32)


def round_half_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    return ((x.view(torch.int32) + 0x8000) & -65536).view(torch.float32)


def mx_exponent(block: torch.Tensor, emax: int = 2) -> int:
    amax = block.abs().max().item()
    if amax == 0:
        return -127
    return max(-127, min(127, math.frexp(amax)[1] - 1 - emax))


def mx_exponent_float32_log2(block, emax=2):  # the usual trap: float32 log2 rounds just below 2^k up to k
    amax = block.abs().max()
    return -127 if amax == 0 else max(-127, int(torch.floor(torch.log2(amax))) - emax)


def block_bits(elem_bits, block_size, scale_bits, tensor_scale_bits=0, numel=None):
    return elem_bits + scale_bits / block_size + (tensor_scale_bits / numel if numel else 0)


def stub(*args):
    raise NotImplementedError("Exercise 1.x: your code here")


def test_bf16_cases_are_torchs_values():
    for code, value in nb01._BF16_CASES:
        assert torch.tensor(code, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).item() == value
        assert formats.decode(code, "bf16").item() == value


def test_ulp_cases_are_the_gap_to_torchs_next_fp16():
    for x, ulp in nb01._ULP_CASES:
        h = torch.tensor(abs(x), dtype=torch.float16)
        if abs(x) == 65504.0:  # the next pattern is inf: use the gap below, same binade
            gap = h.item() - (h.view(torch.int16) - 1).view(torch.float16).item()
        else:
            gap = (h.view(torch.int16) + 1).view(torch.float16).item() - h.item()
        assert gap == ulp


def test_mx_cases_are_qlearns_shared_exponents():
    elem = {2: "fp4_e2m1", 8: "fp8_e4m3", 15: "fp8_e5m2"}
    for block, emax, expected in nb01._MX_CASES:
        assert block.shape == (32,) and block.dtype == torch.float32
        assert mx.shared_exponent(block.abs().max(), elem[emax]).item() == expected
        assert mx.quantize_mx(block[None], elem[emax]).scales.item() == expected + 127  # the E8M0 code
    trap = nb01._MX_CASES[-1][0].abs().max()
    assert torch.log2(trap).item() == -5.0 and math.frexp(trap.item())[1] - 1 == -6  # the trap is real here


def test_bits_cases_are_qlearn_memorys_answers():
    by_name = {"MXFP4": memory.bits_per_param("mxfp4"), "MXFP6": memory.bits_per_param("mxfp6"),
               "MXFP8": memory.bits_per_param("mxfp8"), "NVFP4 without": memory.bits_per_param("nvfp4"),
               "NVFP4 of": memory.bits_per_param("nvfp4", numel=768 * 256), "NF4": memory.bits_per_param("nf4"),
               "INT4": memory.bits_per_param("int4", 32), "DeepSeek": memory.bits_per_param("deepseek_fp8_weight")}
    assert len(by_name) == len(nb01._BITS_CASES)
    for (b, B, s, t, n, name), (prefix, expected) in zip(nb01._BITS_CASES, by_name.items()):
        assert name.startswith(prefix) and block_bits(b, B, s, t, n) == expected, name


def test_correct_answers_pass(capsys):
    assert nb01.decode_bf16(decode_bf16).passed
    assert nb01.fp16_ulp(fp16_ulp).passed
    assert nb01.round_to_bf16(round_to_bf16).passed
    assert nb01.mx_exponent(mx_exponent).passed
    assert nb01.mx_exponent(lambda block, emax: torch.tensor(mx_exponent(block, emax))).passed  # a tensor is fine
    assert nb01.block_bits(block_bits).passed
    assert capsys.readouterr().out.splitlines() == [
        "[qlearn.check] PASSED 1.1 decode a bf16 bit pattern",
        "[qlearn.check] PASSED 1.2 fp16 spacing (ulp) at a value",
        "[qlearn.check] PASSED 1.3 round to bf16 by bit manipulation",
        "[qlearn.check] PASSED 1.4 the E8M0 scale of a block",
        "[qlearn.check] PASSED 1.4 the E8M0 scale of a block",
        "[qlearn.check] PASSED 1.5 bits per weight of a block format"]


@pytest.mark.parametrize("checker,wrong,says", [
    (nb01.decode_bf16, decode_bf16_no_subnormals, "no implicit leading 1"),
    (nb01.decode_bf16, lambda code: decode_bf16(code) * 2, "2^(e - 127)"),
    (nb01.fp16_ulp, fp16_ulp_no_subnormals, "subnormals"),
    (nb01.fp16_ulp, lambda x: 2.0 ** (math.frexp(x)[1] - 11) if x > 0 else -1.0, "use |x|"),
    (nb01.fp16_ulp, lambda x: fp16_ulp(x) * 2, "2^(e - 10)"),
    (nb01.round_to_bf16, truncate_to_bf16, "you truncated"),
    (nb01.round_to_bf16, round_half_up_to_bf16, "round half to even"),
    (nb01.round_to_bf16, lambda x: round_to_bf16(x).to(torch.bfloat16), "return float32"),
    (nb01.round_to_bf16, lambda x: round_to_bf16(x)[1:], "expected shape"),
    (nb01.round_to_bf16, lambda x: x.half().float(), "view the float32 as int32"),
    (nb01.mx_exponent, lambda b, emax: mx_exponent(b, emax) + emax, "subtract the element's emax"),
    (nb01.mx_exponent, lambda b, emax: math.floor(math.log2(b.abs().max())) - emax if b.any() else -127,
     "clamp X to E8M0's range"),  # right but unclamped: a float32-subnormal amax gives -132
    (nb01.mx_exponent, lambda b, emax: math.ceil(math.log2(b.abs().max())) - emax if b.any() else -127,
     "round log2 amax down (floor), not up"),
    (nb01.mx_exponent, lambda b, emax: math.floor(math.log2(b.max())) - emax if b.any() else -127,
     "largest magnitude"),
    (nb01.mx_exponent, mx_exponent_float32_log2, "math.frexp"),
    (nb01.mx_exponent, lambda b, emax: math.floor(math.log2(b.abs().max())) - emax, "all-zero block"),
    (nb01.mx_exponent, lambda b, emax: float(mx_exponent(b, emax)) + 0.5, "return an int"),
    (nb01.block_bits, lambda b, B, s, t=0, n=None: b + s + (t / n if n else 0), "not scale_bits"),
    (nb01.block_bits, lambda b, B, s, t=0, n=None: block_bits(b, B, s, t, n) / 8, "not bytes"),
    (nb01.block_bits, lambda b, B, s, t=0, n=None: b + s / B, "tensor_scale_bits / numel"),
    (nb01.block_bits, lambda b, B, s, t=0, n=None: b + s / B + t / n, "numel=None means"),
    (nb01.block_bits, lambda b, B, s, t=0, n=None: b + s / B + 1, "elem_bits + scale_bits / block_size"),
])
def test_wrong_answers_fail_with_a_hint(checker, wrong, says, capsys):
    result = checker(wrong)
    assert result.status == "FAILED" and says in result.message
    assert capsys.readouterr().out.startswith("[qlearn.check] FAILED 1.")


@pytest.mark.parametrize("checker", [nb01.decode_bf16, nb01.fp16_ulp, nb01.round_to_bf16, nb01.mx_exponent,
                                     nb01.block_bits])
def test_stub_is_not_attempted(checker, capsys):
    assert checker(stub).status == "NOT ATTEMPTED"
    assert "NOT ATTEMPTED" in capsys.readouterr().out
