"""qlearn.quant.rtn: round-to-nearest with groups, the grid GPTQ, AWQ and HQQ build on."""

import pytest
import torch

from qlearn.quant import rtn


def _w(rows=16, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_is_at_most_half_a_step(bits, group_size, symmetric):
    w = _w()
    w_hat = rtn.quantize_rtn(w, bits, group_size, symmetric=symmetric).dequantize()
    g = group_size or w.shape[1]
    groups, groups_hat = w.reshape(-1, g), w_hat.reshape(-1, g)
    scale, _ = rtn._grid(groups, bits, symmetric)
    # 1e-6 relative: float32 rounding of w / scale; symmetric grids clip -absmax at -2^(b-1) + 1 steps.
    assert torch.all((groups - groups_hat).abs() <= scale / 2 * (1 + 1e-6) + 1e-9)
    assert torch.all(torch.tensor([row.unique().numel() for row in groups_hat]) <= 2**bits)


def test_per_channel_is_one_group_per_row():
    w = _w()
    assert torch.equal(rtn.quantize_rtn(w, 3).dequantize(), rtn.quantize_rtn(w, 3, group_size=w.shape[1]).dequantize())


def test_zero_is_exact_and_dtype_kept():
    w = _w().to(torch.bfloat16)
    w[:, 7] = 0
    for symmetric in (False, True):
        w_hat = rtn.quantize_rtn(w, 4, 32, symmetric=symmetric).dequantize()
        assert w_hat.dtype == torch.bfloat16 and w_hat.shape == w.shape
        assert torch.all(w_hat[:, 7] == 0)


def test_constant_zero_group_does_not_divide_by_zero():
    w = _w()
    w[:, :32] = 0
    w_hat = rtn.quantize_rtn(w, 4, 32).dequantize()
    assert torch.isfinite(w_hat).all() and torch.all(w_hat[:, :32] == 0)


def test_groups_beat_per_channel_on_weight_error():
    w = _w(64, 256)
    w[:, 3] *= 20  # an outlier column: it stretches the grid of its whole row, but only one group of it
    err = lambda g: (w - rtn.quantize_rtn(w, 4, g).dequantize()).pow(2).mean()
    assert err(32) < 0.5 * err(None)


def test_matches_torch_fake_quantize_per_channel_affine_bit_for_bit():
    w = _w(32, 256, seed=3)
    for bits in (3, 4, 8):
        groups = w.reshape(-1, 64)  # groups of 64 are the rows of this view: one channel each
        scale, zero = rtn._grid(groups, bits)
        ours = rtn.quantize_rtn(w, bits, 64).dequantize().reshape(-1, 64)
        theirs = torch.fake_quantize_per_channel_affine(groups, scale.view(-1), zero.view(-1).int(), 0, 0,
                                                        2**bits - 1)
        assert torch.equal(ours, theirs)
    scale, zero = rtn._grid(w, 4)  # group_size=None: one grid per output row
    per_channel = torch.fake_quantize_per_channel_affine(w, scale.view(-1), zero.view(-1).int(), 0, 0, 15)
    assert torch.equal(rtn.quantize_rtn(w, 4).dequantize(), per_channel)


def test_clip_ratio_shrinks_the_grid():
    w = _w()
    clipped = rtn.quantize_rtn(w, 4, 32, clip_ratio=0.5).dequantize()
    assert clipped.abs().max() < 0.6 * w.abs().max()
    assert not torch.equal(clipped, rtn.quantize_rtn(w, 4, 32).dequantize())


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"bits": 9}, ValueError, "bits must be an int in 2..8, got 9"),
    ({"bits": 1}, ValueError, "bits must be an int in 2..8, got 1"),
    ({"bits": 4.0}, ValueError, "bits must be an int in 2..8, got 4.0"),
    ({"bits": 4, "group_size": 48}, ValueError,
     "group_size must be None or a positive int dividing in_features=128, got 48"),
    ({"bits": 4, "group_size": 0}, ValueError, "group_size must be None or a positive int"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        rtn.quantize_rtn(_w(), **kwargs)


def test_bad_weights_raise_clear_errors():
    with pytest.raises(ValueError, match="w must be a 2-D float tensor"):
        rtn.quantize_rtn(torch.randn(8), 4)
    with pytest.raises(ValueError, match="w must be a 2-D float tensor"):
        rtn.quantize_rtn(torch.ones(4, 4, dtype=torch.int64), 4)
    w = _w()
    w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="w contains NaN or inf"):
        rtn.quantize_rtn(w, 4)
