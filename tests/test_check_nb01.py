"""The notebook 01 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted."""

import math

import pytest
import torch

from qlearn import formats
from qlearn.check import nb01


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


def test_correct_answers_pass(capsys):
    assert nb01.decode_bf16(decode_bf16).passed
    assert nb01.fp16_ulp(fp16_ulp).passed
    assert nb01.round_to_bf16(round_to_bf16).passed
    assert capsys.readouterr().out.splitlines() == [
        "[qlearn.check] PASSED 1.1 decode a bf16 bit pattern",
        "[qlearn.check] PASSED 1.2 fp16 spacing (ulp) at a value",
        "[qlearn.check] PASSED 1.3 round to bf16 by bit manipulation"]


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
])
def test_wrong_answers_fail_with_a_hint(checker, wrong, says, capsys):
    result = checker(wrong)
    assert result.status == "FAILED" and says in result.message
    assert capsys.readouterr().out.startswith("[qlearn.check] FAILED 1.")


@pytest.mark.parametrize("checker", [nb01.decode_bf16, nb01.fp16_ulp, nb01.round_to_bf16])
def test_stub_is_not_attempted(checker, capsys):
    assert checker(stub).status == "NOT ATTEMPTED"
    assert "NOT ATTEMPTED" in capsys.readouterr().out
