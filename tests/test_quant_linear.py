"""qlearn.quant.linear: the grid, its round trip, granularities, torch agreement, clipping, errors."""

import warnings

import pytest
import torch

from qlearn.quant import QTensor, quantize
from qlearn.quant.linear import compute_scale_zero_point, mse_clip_search, qrange

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")  # torch 2.13 deprecation


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


def test_matches_torch_quantize_per_tensor_and_per_channel():
    torch.manual_seed(0)
    x = torch.randn(16, 32).clamp(-3.9, 3.9)
    # absmax 127/32 makes the symmetric scale exactly 1/32, so these are exact ties for both torch
    # (which multiplies by 1/scale) and qlearn (which divides): both must round half to even.
    x[0, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5]) / 32
    qt = quantize(x, 8, symmetric=True)
    ref = torch.quantize_per_tensor(x, qt.scale.item(), 0, torch.qint8)
    assert torch.equal(ref.int_repr(), qt.q) and torch.equal(ref.dequantize(), qt.dequantize())
    qa = quantize(x, 8, symmetric=False)
    ref = torch.quantize_per_tensor(x, qa.scale.item(), int(qa.zero_point), torch.quint8)
    assert torch.equal(ref.int_repr(), qa.q) and torch.equal(ref.dequantize(), qa.dequantize())
    for axis in (0, 1):
        qc = quantize(x, 8, symmetric=False, axis=axis)
        ref = torch.quantize_per_channel(x, qc.scale.flatten(), qc.zero_point.flatten().long(), axis, torch.quint8)
        assert torch.equal(ref.int_repr(), qc.q)
        assert torch.allclose(ref.dequantize(), qc.dequantize(), atol=0, rtol=1e-6)  # float op order may differ


def test_all_zero_group_gives_zeros_not_nan():
    x = torch.zeros(2, 8)
    x[1] = torch.arange(8.0)
    for symmetric in (True, False):
        out = quantize(x, 4, symmetric, group_size=4).dequantize()
        assert torch.isfinite(out).all() and (out[0] == 0).all()


def test_clipping_trades_range_for_resolution():
    torch.manual_seed(0)
    x = torch.randn(10000)
    best, ratios, errors = mse_clip_search(x, 3)
    assert 0.3 <= best < 1.0  # for Gaussian data at 3 bits, clipping some outliers lowers the MSE
    assert errors.min() < errors[-1]
    qt = quantize(x, 3, clip_ratio=best)
    assert (qt.dequantize().abs().max() <= x.abs().max() * best + 1e-6)


def test_repr_and_bits_per_param():
    qt = quantize(torch.randn(8, 64), 4, symmetric=False, group_size=32)
    assert "bits=4" in repr(qt) and "per-group(32)" in repr(qt) and isinstance(qt, QTensor)
    assert qt.bits_per_param() == pytest.approx(4 + 32 / 32)  # fp16 scale + fp16 zero point per 32


def test_keeps_dtype():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert quantize(x, 8).dequantize().dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,error,match", [
    ({"bits": 9}, ValueError, "bits must be an int in 2..8"),
    ({"bits": 1}, ValueError, "bits must be an int in 2..8"),
    ({"group_size": 5}, ValueError, "group_size must be a positive int dividing"),
    ({"axis": 2}, ValueError, "axis must be None or an int"),
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
