"""qlearn.quant.nf4 against bitsandbytes 0.50 on the CPU: code books, blockwise absmax, double quant."""

import logging

import pytest
import torch

from qlearn.quant import nf4

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU backend notes about optional kernels
bnbF = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (256, 768): a weight; (33, 70): 2310 values, not a multiple of 64; (7, 9): odd last dim (bnb's
# fallback kernel); (1000,): 1-D; (5, 3, 64): 3-D.
SHAPES = [(256, 768), (33, 70), (7, 9), (1000,), (5, 3, 64)]


def _bnb_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bitsandbytes packs two codes per byte, the first in the high nibble."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[5] = 0.0  # an exact zero
    w.view(-1)[-1] = 0.3  # an outlier in the last block
    return w.to(dtype)


def test_nf4_codebook_matches_bitsandbytes_table():
    ours, theirs = nf4.codebook(), bnbF.get_4bit_type("nf4", device="cpu")
    assert torch.equal(ours, theirs)  # bit for bit: same offset, float32 probabilities, float64 icdf


def test_nf4_codebook_has_8_positive_7_negative_and_an_exact_zero():
    table = nf4.codebook()
    assert table.shape == (16,) and table.dtype == torch.float32
    assert torch.all(table[1:] > table[:-1]), "sorted, no duplicates"
    assert (table > 0).sum() == 8 and (table < 0).sum() == 7 and (table == 0).sum() == 1
    assert table[0] == -1.0 and table[-1] == 1.0
    assert abs(nf4.NF4_OFFSET - 0.9677083) < 1e-7  # the constant bitsandbytes' create_normal_map uses


def test_fp4_codebook_is_bitsandbytes_fp4_not_ocp_e2m1():
    ours, theirs = nf4.fp4_codebook(), bnbF.get_4bit_type("fp4", device="cpu")
    assert torch.equal(ours, theirs)
    e2m1 = nf4.e2m1_codebook()
    assert torch.equal(e2m1[:8] * 6, torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6]))
    shared = set(ours.tolist()) & set(e2m1.tolist())
    assert len(shared) == 13  # 0 and +-{1/6, 1/4, 1/3, 1/2, 2/3, 1}: 13 distinct values in common
    assert ours[1] == pytest.approx(0.0625 / 12) and e2m1[1] == pytest.approx(0.5 / 6)
    assert not torch.equal(ours, e2m1), "same bit patterns mean different values"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_matches_bitsandbytes_bit_for_bit(quant_type, shape, dtype):
    w = _weight(shape, dtype)
    quantize = nf4.quantize_nf4 if quant_type == "nf4" else nf4.quantize_fp4
    ours = quantize(w, blocksize=64)
    codes, absmax = ours.codes, ours.absmax
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= 15
    assert torch.equal(codes.reshape(-1), _bnb_codes(packed, w.numel()))
    assert absmax.dtype == torch.float32 and torch.equal(absmax, state.absmax)
    assert ours.quant_type == quant_type and ours.blocksize == 64 and ours.shape == w.shape
    w_hat = ours.dequantize()  # in w's dtype, as bitsandbytes' QuantState keeps it
    theirs = bnbF.dequantize_4bit(packed, state)
    assert w_hat.dtype == w.dtype and w_hat.shape == w.shape
    # bitsandbytes' CPU kernel returns a 1-D input as (1, n): compare the values, not that quirk.
    assert torch.equal(w_hat.reshape(-1), theirs.reshape(-1))


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_nf4_matches_bitsandbytes_at_other_blocksizes(blocksize):
    w = _weight((64, 200), torch.float32, seed=1)
    ours = nf4.quantize_nf4(w, blocksize=blocksize)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(ours.codes.reshape(-1), _bnb_codes(packed, w.numel()))
    assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(packed, state))
    assert ours.bits_per_param() == pytest.approx(4 + 32 * ours.absmax.numel() / w.numel())


@pytest.mark.parametrize("table_fn", [nf4.codebook, nf4.fp4_codebook])
def test_round_trip_error_is_at_most_half_the_largest_gap_times_absmax(table_fn):
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(2))
    table = table_fn()
    state = nf4.quantize_blockwise(w, table, blocksize=64)
    absmax, w_hat = state.absmax, state.dequantize()
    half_gap = (table.sort().values.diff().max() / 2).item()
    err = (w - w_hat).abs().reshape(-1)
    bound = torch.repeat_interleave(absmax, 64)[: w.numel()] * half_gap
    assert torch.all(err <= bound * (1 + 1e-6))  # 1e-6: float32 rounding of the scaled values
    block_max = w.reshape(-1).abs().reshape(-1, 64).argmax(dim=1) + torch.arange(0, w.numel(), 64)
    assert torch.equal(w_hat.reshape(-1)[block_max].abs(), w.reshape(-1)[block_max].abs()), "absmax is exact"


def test_all_zero_block_gives_zeros_not_nan():
    w = torch.zeros(3, 64)
    w[1] = torch.linspace(-1, 1, 64)
    state = nf4.quantize_nf4(w)
    codes, absmax = state.codes, state.absmax
    assert absmax.tolist()[0] == 0.0 and absmax.tolist()[2] == 0.0
    w_hat = state.dequantize()
    assert torch.equal(w_hat[0], torch.zeros(64)) and torch.isfinite(w_hat).all()
    assert int(codes[0, 0]) == 7, "NF4's exact zero is code 7"


def test_dynamic_codebook_matches_bitsandbytes_create_dynamic_map():
    table = nf4.dynamic_codebook()
    assert table.shape == (256,) and torch.equal(table, bnbF.create_dynamic_map())


def _nested_absmax(n_blocks: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n_blocks * 64, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[:640] *= 8  # ten blocks with larger scales: the absmax values are not all alike
    return w, bnbF.quantize_4bit(w.view(-1, 128), blocksize=64, quant_type="nf4")[1].absmax


@pytest.mark.parametrize("n_blocks", [3072, 1000])  # 1000: the last second-level block is partial
def test_double_quantize_matches_bitsandbytes_compress_statistics(n_blocks):
    w, absmax = _nested_absmax(n_blocks)
    ours = nf4.double_quantize(absmax, blocksize=256)
    _, state = bnbF.quantize_4bit(w.view(-1, 128), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert state.nested and state.state2.blocksize == 256
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.absmax, state.state2.absmax)
    assert torch.equal(nf4.dynamic_codebook(), state.state2.code)
    # Codes: bitsandbytes' CPU kernel (approximate binary search + a two-neighbour check) sometimes keeps
    # the second-nearest code at a near-tie; ours is always the nearest. So: few mismatches, each one
    # step apart, and ours never farther from the true value than bitsandbytes'.
    differ = ours.codes != state.absmax
    assert differ.float().mean() < 0.01
    assert (ours.codes.int() - state.absmax.int())[differ].abs().max() <= 1
    table, scale = nf4.dynamic_codebook(), torch.repeat_interleave(ours.absmax, 256)[: absmax.numel()]
    target = (absmax - ours.offset) / scale
    assert torch.all((table[ours.codes.long()] - target).abs() <= (table[state.absmax.long()] - target).abs() + 1e-7)
    # Rebuilt scales: equal where the codes agree, within one code step (<= 0.03 of absmax2) elsewhere.
    ours_absmax = ours.dequantize()
    theirs = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(ours_absmax[~differ], theirs[~differ])
    assert torch.all((ours_absmax - theirs).abs() <= 0.03 * scale)


def test_double_quantize_error_is_small_and_bounded():
    _, absmax = _nested_absmax(3072, seed=3)
    dq = nf4.double_quantize(absmax)
    rebuilt = dq.dequantize()
    assert rebuilt.shape == absmax.shape and rebuilt.dtype == torch.float32
    half_gap = nf4.dynamic_codebook().diff().max().item() / 2
    bound = torch.repeat_interleave(dq.absmax, 256) * half_gap
    assert torch.all((rebuilt - absmax).abs() <= bound + 1e-7)  # 1e-7: float32 rounding at these magnitudes
    assert ((rebuilt - absmax).abs() / absmax).mean() < 0.01


def test_double_quantization_costs_4_127_bits_per_parameter():
    n = 256 * 1024
    w = torch.randn(n)
    plain_state, double_state = nf4.quantize_nf4(w), nf4.quantize_nf4(w, double_quant=True)
    codes, absmax, dq = plain_state.codes, plain_state.absmax, double_state.nested
    plain = (4 * codes.numel() + 32 * absmax.numel()) / n
    double = (4 * codes.numel() + 8 * dq.codes.numel() + 32 * dq.absmax.numel() + 32) / n
    assert plain == 4.5 == plain_state.bits_per_param()
    assert double == double_state.bits_per_param()  # the state counts what is stored, as written out here
    # 2e-4: the paper's 4.127 leaves out the one float32 offset per tensor (32 / n bits).
    assert double == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-4) and round(double, 3) == 4.127
    # the double-quantized state dequantizes with the rebuilt scales, within 1% of the plain one's error
    err_plain = (plain_state.dequantize() - w).abs().mean()
    err_double = (double_state.dequantize() - w).abs().mean()
    assert err_plain <= err_double < 1.01 * err_plain


@pytest.mark.parametrize(("bad", "error", "match"), [
    ([1.0, 2.0], TypeError, "w must be a torch.Tensor"),
    (torch.arange(8), TypeError, "w must be float32"),
    (torch.tensor([1.0, float("nan")]), ValueError, "NaN or inf"),
    (torch.empty(0), ValueError, "w is empty"),
])
def test_quantize_rejects_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        nf4.quantize_nf4(bad)


@pytest.mark.parametrize("blocksize", [0, -64, 64.0, True])
def test_quantize_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        nf4.quantize_nf4(torch.randn(64), blocksize=blocksize)


def test_a_state_rejects_mismatched_parts():
    from dataclasses import replace

    state = nf4.quantize_nf4(torch.randn(256))
    with pytest.raises(ValueError, match="absmax has 4 values but 256 codes in blocks of 32 need 8"):
        replace(state, blocksize=32)
    with pytest.raises(TypeError, match="codes must be a uint8"):
        replace(state, codes=state.codes.long())
    with pytest.raises(ValueError, match="codes must be < 16"):
        replace(state, codes=state.codes + 16)
    with pytest.raises(ValueError, match="absmax has 4 values but 256 codes in blocks of 32 need 8"):
        nf4.dequantize_blockwise(state.codes, state.absmax, nf4.codebook(), 32)  # the functional form too


def test_state_repr_names_bits_blocks_and_type():
    state = nf4.quantize_nf4(torch.randn(4, 64), double_quant=True)
    text = repr(state)
    assert "bits=4" in text and "blockwise(64) + double quant" in text and "'nf4'" in text and "(4, 64)" in text
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        nf4.quantize_nf4(torch.randn(64), double_quant="yes")


def test_double_quantize_rejects_2d_absmax():
    with pytest.raises(ValueError, match="absmax must be 1-D"):
        nf4.double_quantize(torch.rand(4, 4))
