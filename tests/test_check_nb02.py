"""The notebook 02 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted."""

import torch

from qlearn.check import nb02


def symmetric_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    return x.abs().max() / (2 ** (bits - 1) - 1)


def symmetric_scale_full_range(x: torch.Tensor, bits: int) -> torch.Tensor:  # divides by 128, not 127
    return x.abs().max() / 2 ** (bits - 1)


def symmetric_scale_no_abs(x: torch.Tensor, bits: int) -> torch.Tensor:
    return x.max() / (2 ** (bits - 1) - 1)


def asymmetric_params(x: torch.Tensor, bits: int):
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / (2**bits - 1)
    return scale, round(-lo / scale)


def asymmetric_params_without_zero(x: torch.Tensor, bits: int):  # the range does not hold 0
    lo, hi = x.min().item(), x.max().item()
    scale = (hi - lo) / (2**bits - 1)
    return scale, round(-lo / scale)


def asymmetric_params_wrong_sign(x: torch.Tensor, bits: int):
    scale, zero_point = asymmetric_params(x, bits)
    return scale, -zero_point


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    return ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)


def pack_4bit_low_first(codes: torch.Tensor) -> torch.Tensor:
    return (codes[0::2] | (codes[1::2] << 4)).to(torch.uint8)


def symmetric_scale_full_grid(x: torch.Tensor, bits: int) -> torch.Tensor:  # GPTQ's scale, 2 absmax / 15
    return 2 * x.abs().max() / (2**bits - 1)


def bits_per_param(bits: int, group_size: int, symmetric: bool, zero_point_bits: int = 16) -> float:
    return bits + (16 + (0 if symmetric else zero_point_bits)) / group_size


def bits_per_param_no_zero_point(bits: int, group_size: int, symmetric: bool, zero_point_bits: int = 16) -> float:
    return bits + 16 / group_size


def bits_per_param_zero_point_always_16(bits: int, group_size: int, symmetric: bool, zero_point_bits: int = 16) -> float:
    return bits + (16 if symmetric else 32) / group_size


def bits_per_param_three_arguments(bits: int, group_size: int, symmetric: bool) -> float:  # the old signature
    return bits + (16 if symmetric else 32) / group_size


def stub(*args):
    raise NotImplementedError("Exercise 2.k: ...")


def test_symmetric_scale(capsys):
    assert nb02.symmetric_scale(symmetric_scale).passed
    assert "PASSED 2.1" in capsys.readouterr().out
    result = nb02.symmetric_scale(symmetric_scale_full_range)
    assert result.status == "FAILED" and "divide by 2^(bits-1) - 1" in result.message
    result = nb02.symmetric_scale(symmetric_scale_no_abs)
    assert result.status == "FAILED" and "largest |x|" in result.message
    result = nb02.symmetric_scale(symmetric_scale_full_grid)
    assert result.status == "FAILED" and "full grid" in result.message
    assert nb02.symmetric_scale(stub).status == "NOT ATTEMPTED"


def test_symmetric_scale_matches_qlearn():
    from qlearn.quant.linear import compute_scale_zero_point

    for x, bits, expected in nb02._SYM_CASES:
        scale, _ = compute_scale_zero_point(torch.tensor(x), bits, symmetric=True)
        assert abs(scale.item() - expected) <= 1e-6 * expected  # float32 vs float64


def test_asymmetric_params(capsys):
    assert nb02.asymmetric_params(asymmetric_params).passed
    assert "PASSED 2.2" in capsys.readouterr().out
    result = nb02.asymmetric_params(asymmetric_params_without_zero)
    assert result.status == "FAILED" and "stretch the range to hold 0" in result.message
    result = nb02.asymmetric_params(asymmetric_params_wrong_sign)
    assert result.status == "FAILED" and "check the sign" in result.message
    assert nb02.asymmetric_params(stub).status == "NOT ATTEMPTED"


def test_asymmetric_cases_match_qlearn_and_torch_observer():
    from torch.ao.quantization.observer import MinMaxObserver

    from qlearn.quant.linear import compute_scale_zero_point

    for x, bits, scale, zero_point in nb02._ASYM_CASES:
        s, zp = compute_scale_zero_point(torch.tensor(x), bits, symmetric=False)
        assert abs(s.item() - scale) <= 1e-6 * scale and zp.item() == zero_point  # float32 vs float64
        obs = MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=2**bits - 1)
        obs(torch.tensor(x))
        assert obs.calculate_qparams()[1].item() == zero_point


def test_pack_4bit(capsys):
    assert nb02.pack_4bit(pack_4bit).passed
    assert "PASSED 2.3" in capsys.readouterr().out
    result = nb02.pack_4bit(pack_4bit_low_first)
    assert result.status == "FAILED" and "high nibble" in result.message
    result = nb02.pack_4bit(lambda codes: codes)  # not packed at all
    assert result.status == "FAILED" and "half as many" in result.message
    assert nb02.pack_4bit(stub).status == "NOT ATTEMPTED"


def test_bits_per_param(capsys):
    assert nb02.bits_per_param(bits_per_param).passed
    assert "PASSED 2.4" in capsys.readouterr().out
    result = nb02.bits_per_param(bits_per_param_no_zero_point)
    assert result.status == "FAILED" and "also stores its zero point" in result.message
    result = nb02.bits_per_param(bits_per_param_zero_point_always_16)
    assert result.status == "FAILED" and "not always 16" in result.message and "4.15625" in result.message
    result = nb02.bits_per_param(bits_per_param_three_arguments)  # no zero_point_bits parameter
    assert result.status == "FAILED" and "raised" in result.message
    assert nb02.bits_per_param(stub).status == "NOT ATTEMPTED"


def test_bits_per_param_cases_match_qtensor():
    from dataclasses import replace

    from qlearn.quant import quantize

    for bits, group_size, symmetric, zero_point_bits, expected in nb02._BPP_CASES:
        qt = quantize(torch.randn(4, 256), bits, symmetric, group_size=group_size)
        if zero_point_bits is not None:
            qt = replace(qt, zero_point_bits=zero_point_bits)
        assert qt.bits_per_param() == expected  # exact: sums of powers of two


def test_a_crashing_answer_is_reported_not_raised():
    result = nb02.pack_4bit(lambda codes: codes.reshape(3, -1))  # raises RuntimeError on 2 codes
    assert result.status == "FAILED" and "raised" in result.message
