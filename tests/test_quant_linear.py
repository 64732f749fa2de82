"""qlearn.quant.linear: the grid, its round trip, granularities, torch agreement, clipping, errors."""

from dataclasses import replace

import pytest
import torch

from qlearn.quant import QTensor, quantize
from qlearn.quant.linear import (
    SCALE_FLOOR,
    compute_scale_zero_point,
    dequantize_codes,
    mse_clip_search,
    qrange,
    quantize_codes,
)

# torch 2.13 deprecates the quantized dtypes these tests compare against; they still work
pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning")


def granularities(shape):
    yield {}
    yield {"axis": 0}
    yield {"axis": -1}
    if shape[-1] % 4 == 0:
        yield {"group_size": 4}


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(16,), (8, 12), (3, 4, 8)])
def test_round_trip_within_half_a_step(bits, symmetric, shape):
    torch.manual_seed(bits)
    x = torch.randn(shape) * 3
    for kw in granularities(shape):
        qt = quantize(x, bits, symmetric, **kw)
        err = (qt.dequantize() - x).abs()
        g = kw.get("group_size")
        grouped = x.reshape(*x.shape[:-1], x.shape[-1] // g, g) if g else x
        step = (qt.scale * torch.ones_like(grouped)).reshape(x.shape)  # each value's own scale
        # every x is inside its grid's range (clip_ratio=1), so |error| <= scale/2 (+ float rounding)
        assert (err <= step / 2 + 1e-5).all(), kw
        lo, hi = qrange(bits, symmetric)
        assert int(qt.q.min()) >= lo and int(qt.q.max()) <= hi
        assert qt.dequantize().shape == x.shape and qt.dequantize().dtype == x.dtype


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_is_exact(symmetric):
    x = torch.tensor([[-1.3, 0.0, 0.7, 2.9], [0.0, 0.1, 0.2, 5.0]])
    for kw in granularities(x.shape):
        assert (quantize(x, 4, symmetric, **kw).dequantize()[x == 0] == 0).all()


def test_symmetric_scale_and_asymmetric_zero_point_formulas():
    x = torch.tensor([-2.0, 0.5, 1.0, 4.0])
    scale, zp = compute_scale_zero_point(x, 8, symmetric=True)
    assert scale.item() == pytest.approx(4.0 / 127) and zp.item() == 0
    scale, zp = compute_scale_zero_point(x, 8, symmetric=False)
    assert scale.item() == pytest.approx(6.0 / 255)
    assert zp.item() == round(2.0 / (6.0 / 255))  # round(-min / scale) = 85


def test_asymmetric_wins_on_a_skewed_relu_like_tensor():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4096))
    sym = (quantize(x, 4, True).dequantize() - x).pow(2).mean()
    asym = (quantize(x, 4, False).dequantize() - x).pow(2).mean()
    assert asym < 0.5 * sym  # symmetric wastes the negative half of its grid


def test_per_channel_rescues_an_outlier_channel():
    torch.manual_seed(0)
    w = torch.randn(64, 64) * 0.02
    w[3] *= 100  # one output channel 100x larger
    per_tensor = (quantize(w, 4).dequantize() - w)[torch.arange(64) != 3].pow(2).mean()
    per_channel = (quantize(w, 4, axis=0).dequantize() - w)[torch.arange(64) != 3].pow(2).mean()
    assert per_channel < per_tensor / 30  # per-tensor rounds the small channels to 0


def test_ties_round_half_to_even_like_torch():
    # scale 1/32 (absmax 127/32) makes x * (1/scale) exact, so these are exact ties
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]) / 32
    qt = quantize(x, 8, symmetric=True)
    assert qt.scale.item() == 1 / 32
    assert qt.q.tolist() == [127, 0, 2, 2, 0, -2, -2, 4]
    ref = torch.quantize_per_tensor(x, qt.scale.item(), 0, torch.qint8)
    assert torch.equal(ref.int_repr(), qt.q)


def test_asymmetric_ties_round_the_code_not_x_over_scale():
    # torch adds the zero point before rounding: at x/scale = k + 0.5 with an odd zero point,
    # half-to-even applies to the code k + 0.5 + zp, one away from round(k + 0.5) + zp
    x = (torch.arange(-6, 6) + 0.5) * 0.25  # exact ties on a grid of step 0.25
    scale, zp = torch.tensor(0.25), torch.tensor(7.0)
    ours = quantize_codes(x, scale, zp, 8, symmetric=False)
    ref = torch.quantize_per_tensor(x, 0.25, 7, torch.quint8).int_repr()
    assert torch.equal(ours, ref)
    assert ours.tolist() == [2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12]
    naive = torch.round(x / scale) + zp
    assert not torch.equal(naive.to(torch.uint8), ref)


@pytest.mark.parametrize("seed", range(3))
def test_matches_torch_quantize_per_tensor_on_random_data(seed):
    torch.manual_seed(seed)
    x = torch.randn(200_000) * (seed + 1) * 0.05  # enough values that near-ties occur
    for symmetric, dtype in ((True, torch.qint8), (False, torch.quint8)):
        qt = quantize(x, 8, symmetric)
        ref = torch.quantize_per_tensor(x, qt.scale.item(), int(qt.zero_point), dtype)
        assert torch.equal(ref.int_repr(), qt.q)
        assert torch.equal(ref.dequantize(), qt.dequantize())


def test_multiplying_by_the_reciprocal_is_what_makes_codes_equal_torch():
    torch.manual_seed(0)
    x = torch.randn(1_000_000)
    scale = torch.tensor(0.01)  # not a power of 2: x / scale and x * (1 / scale) differ in the last bit
    divided = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
    ref = torch.quantize_per_tensor(x.clamp(-1.27, 1.27), 0.01, 0, torch.qint8).int_repr()
    ours = quantize_codes(x, scale, torch.tensor(0.0), 8, symmetric=True)
    assert torch.equal(ours, ref)
    assert (divided != ref).sum() > 0  # the naive division flips a few codes next to ties


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_matches_torch_quantize_per_channel(axis):
    torch.manual_seed(axis + 5)
    x = torch.randn(16, 4096) * torch.rand(16, 1)
    for symmetric, dtype in ((True, torch.qint8), (False, torch.quint8)):
        qc = quantize(x, 8, symmetric, axis=axis)
        ref = torch.quantize_per_channel(x, qc.scale.flatten().double(), qc.zero_point.flatten().long(),
                                         axis % 2, dtype)
        assert torch.equal(ref.int_repr(), qc.q)
        assert torch.equal(ref.dequantize(), qc.dequantize())


def test_scales_and_zero_points_equal_torch_observers():
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    torch.manual_seed(0)
    x = torch.randn(8, 32) + 0.3
    obs = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127)
    obs(x)
    scale, zp = obs.calculate_qparams()
    ours = compute_scale_zero_point(x, 8, symmetric=True)
    assert ours[0].item() == scale.item() and zp.item() == 0 and ours[1].item() == 0
    obs = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    obs(x)
    scale, zp = obs.calculate_qparams()
    ours = compute_scale_zero_point(x, 8, symmetric=False)
    assert ours[0].item() == scale.item() and ours[1].item() == zp.item()
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine)
    obs(x)
    scale, zp = obs.calculate_qparams()
    ours = compute_scale_zero_point(x, 8, symmetric=False, axis=0)
    assert torch.equal(ours[0].flatten(), scale.float()) and torch.equal(ours[1].flatten().long(), zp)


def test_building_blocks_reproduce_quantize():
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    qt = quantize(x, 3, symmetric=False, group_size=8)
    scale, zp = compute_scale_zero_point(x, 3, symmetric=False, group_size=8)
    assert scale.shape == (6, 2, 1) and zp.shape == (6, 2, 1)
    q = quantize_codes(x.reshape(6, 2, 8), scale, zp, 3, symmetric=False)  # (rows, groups, group_size)
    assert torch.equal(q.reshape(6, 16), qt.q)
    assert torch.equal(dequantize_codes(q, scale, zp).reshape(6, 16), qt.dequantize())


def test_scale_layouts():
    x = torch.randn(4, 6, 8)
    assert quantize(x).scale.shape == ()
    assert quantize(x, axis=1).scale.shape == (1, 6, 1)
    assert quantize(x, axis=-1).axis == 2
    assert quantize(x, group_size=4).scale.shape == (4, 6, 2, 1)


def test_per_channel_of_a_1d_tensor_gives_one_scale_per_value():
    x = torch.tensor([1.0, -2.0, 0.5])
    qt = quantize(x, 8, axis=0)
    assert qt.scale.shape == (3,) and qt.q.tolist() == [127, -127, 127]
    assert torch.allclose(qt.dequantize(), x, rtol=1e-6, atol=0)  # each value is its own absmax


def test_all_zero_group_gives_zeros_not_nan():
    x = torch.zeros(2, 8)
    x[1] = torch.arange(8.0)
    for symmetric in (True, False):
        qt = quantize(x, 4, symmetric, group_size=4)
        out = qt.dequantize()
        assert torch.isfinite(out).all() and (out[0] == 0).all()
        assert qt.scale[0].flatten().tolist() == [SCALE_FLOOR] * 2  # torch observers' floor, not 0


def test_clipping_trades_range_for_resolution():
    torch.manual_seed(0)
    x = torch.randn(10000)
    best, _ratios, errors = mse_clip_search(x, 3)
    assert 0.3 <= best < 1.0  # for Gaussian data at 3 bits, clipping some outliers lowers the MSE
    assert errors.min() < errors[-1]
    qt = quantize(x, 3, clip_ratio=best)
    assert (qt.dequantize().abs().max() <= x.abs().max() * best + 1e-6)


def test_repr_and_bits_per_param():
    qt = quantize(torch.randn(8, 64), 4, symmetric=False, group_size=32)
    assert "bits=4" in repr(qt) and "per-group(32)" in repr(qt) and isinstance(qt, QTensor)
    assert qt.bits_per_param() == 4 + 32 / 32  # fp16 scale + fp16 zero point per 32 values
    assert replace(qt, zero_point_bits=4).bits_per_param() == 4 + 20 / 32  # GPTQ-style packed zero points
    assert qt.nbytes() == (8 * 64 * 4 + 16 * 32) // 8
    sym = quantize(torch.randn(8, 256), 4, group_size=128)
    assert sym.bits_per_param() == 4.125 and sym.storage_bits() == 8 * 256 * 4 + 16 * 16


def test_keeps_dtype():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert quantize(x, 8).dequantize().dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,error,match", [
    ({"bits": 9}, ValueError, "bits must be an int in 2..8"),
    ({"bits": 1}, ValueError, "bits must be an int in 2..8"),
    ({"group_size": 5}, ValueError, "group_size must be a positive int dividing"),
    ({"axis": 2}, ValueError, r"axis must be None or an int in \[-2, 1\]"),
    ({"axis": -3}, ValueError, "axis must be None or an int"),
    ({"group_size": 0}, ValueError, "group_size must be a positive int"),
    ({"axis": 0, "group_size": 4}, ValueError, "not both"),
    ({"clip_ratio": 0.0}, ValueError, "clip_ratio must be in"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize(torch.randn(4, 8), **kwargs)


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.arange(8))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(torch.tensor([1.0, float("inf")]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.zeros(0))
    with pytest.raises(ValueError, match=r"group_size must be .*\(None\)"):
        quantize(torch.tensor(1.0), group_size=1)


def test_the_two_rounding_rules_differ_at_exact_ties_with_odd_zero_points():
    # scale 0.125, zero point 3 (odd): x / scale = 0.5 is an exact tie
    x, scale, zero = torch.tensor([0.0625, -0.1875, 0.3125]), torch.tensor(0.125), torch.tensor(3.0)
    first = quantize_codes(x, scale, zero, 4, symmetric=False)  # round(x/s + z): torch.quantize_per_tensor
    after = quantize_codes(x, scale, zero, 4, symmetric=False, rounding="zero_point_after")  # round(x/s) + z
    assert first.tolist() == [4, 2, 6] and after.tolist() == [3, 1, 5]
    torch_q = torch.quantize_per_tensor(x, 0.125, 3, torch.quint8).int_repr()
    torch_fq = torch.fake_quantize_per_tensor_affine(x, 0.125, 3, 0, 15)
    assert torch.equal(first, torch_q)  # each rule bit for bit with its torch twin
    assert torch.equal(dequantize_codes(after, scale, zero), torch_fq)
    # an even zero point: half-to-even lands on the same code either way
    assert torch.equal(quantize_codes(x, scale, torch.tensor(2.0), 4, symmetric=False),
                       quantize_codes(x, scale, torch.tensor(2.0), 4, symmetric=False, rounding="zero_point_after"))
    with pytest.raises(ValueError, match="rounding must be one of"):
        quantize_codes(x, scale, zero, 4, rounding="nearest")
