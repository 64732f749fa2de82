"""qlearn.quant.activations: per-tensor / per-token activation fake-quantization, static scales, W8A8."""

import pytest
import torch
from torch import nn

from qlearn.quant import activations, linear


def _x(seed=0, shape=(3, 5, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 2] *= 30  # an outlier channel
    return x


def test_per_tensor_equals_torch_fake_quantize_bit_for_bit():
    x = _x()
    s = activations.absmax_scale(x, 8, "per_tensor")
    ref = torch.fake_quantize_per_tensor_affine(x, s.item(), 0, -127, 127)
    assert torch.equal(activations.fake_quantize(x, 8, "per_tensor"), ref)


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_equals_torch_fake_quantize_per_channel_over_the_rows(bits):
    x = _x(1)
    rows = x.reshape(-1, x.shape[-1])  # (tokens, features): one scale per row
    q_max = 2 ** (bits - 1) - 1
    s = rows.abs().amax(1) / q_max
    ref = torch.fake_quantize_per_channel_affine(rows, s, torch.zeros(len(s), dtype=torch.int32), 0, -q_max, q_max)
    assert torch.equal(activations.fake_quantize(x, bits, "per_token"), ref.reshape(x.shape))


def test_round_trip_within_half_a_step_and_static_scales_saturate():
    x = _x(2)
    s = activations.absmax_scale(x, 8, "per_token")
    assert ((activations.fake_quantize(x, 8, "per_token") - x).abs() <= s / 2 * (1 + 1e-6)).all()  # 1e-6: x*(1/s)
    static = torch.tensor(0.01)  # a range of +-1.27: larger values are clamped
    y = activations.fake_quantize(x, 8, scale=static)
    assert y.abs().max().item() == pytest.approx(1.27) and (y.abs() <= 1.27 + 1e-6).all()


def test_an_outlier_channel_costs_per_tensor_more_than_per_token_only_when_tokens_differ():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=g)
    x[:4] *= 50  # four outlier tokens: per-token isolates them, per-tensor lets them set everyone's scale
    err = {gr: (activations.fake_quantize(x, 8, gr) - x)[4:].pow(2).mean().item() for gr in activations.GRANULARITIES}
    assert err["per_tensor"] > 100 * err["per_token"]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))


def test_simulate_quantizes_weights_and_inputs_then_restores_everything():
    model = _model()
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    weights = [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    with torch.no_grad():
        before = model(ids)
        with activations.simulate(model, 8, 8, exclude=()) as m:
            got = m(ids)
        h = model[0](ids)
        w1 = linear.quantize(model[1].weight, 8, symmetric=True, axis=0).dequantize()
        w2 = linear.quantize(model[3].weight, 8, symmetric=True, axis=0).dequantize()
        y = torch.relu(activations.fake_quantize(h) @ w1.T + model[1].bias)
        expected = activations.fake_quantize(y) @ w2.T + model[3].bias
        assert torch.equal(got, expected)
        assert not torch.equal(got, before)
        # the very same storage back, unchanged
        assert all(p.data_ptr() == ptr and torch.equal(p, w) for p, (ptr, w) in zip(model.parameters(), weights))
        assert all(not m._forward_pre_hooks for m in model.modules())
        assert torch.equal(model(ids), before)


def test_simulate_restores_the_model_after_an_error_inside():
    model = _model()
    weights = [p.data.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"), activations.simulate(model, 4, 4, exclude=()):
        raise RuntimeError("boom")
    assert all(torch.equal(p.data, w) for p, w in zip(model.parameters(), weights))
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_static_scales_from_calibration_are_the_max_of_each_input():
    model = _model()
    calib = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    scales = activations.calibrate(model, calib, exclude=())
    with torch.no_grad():
        h = model[0](calib)
        assert scales["1"].item() == pytest.approx(h.abs().max().item() / 127, rel=1e-6)  # float32 division
        with activations.simulate(model, None, 8, scales=scales, exclude=()) as m:
            # on the calibration batch itself, static = dynamic per-tensor for the first layer's input
            assert torch.equal(m[1](h), nn.functional.linear(activations.fake_quantize(h), m[1].weight, m[1].bias))


def test_bad_arguments_raise_clear_errors():
    model = _model()
    x = _x()
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        activations.fake_quantize(x, 1)
    with pytest.raises(ValueError, match="granularity must be one of"):
        activations.fake_quantize(x, 8, "per_channel")
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        activations.fake_quantize(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="w_bits and a_bits are both None"), activations.simulate(model, None, None):
        pass
    with pytest.raises(ValueError, match="static scales are per-tensor"), activations.simulate(model, 8, 8, granularity="per_token", scales={}):
        pass
    with pytest.raises(ValueError, match="scales has no entry for 2 selected layers"), activations.simulate(model, 8, 8, scales={}, exclude=()):
        pass
    with pytest.raises(ValueError, match="w_granularity must be one of"), activations.simulate(model, 8, 8, w_granularity="per_group"):
        pass
    with pytest.raises(ValueError, match="calib is missing"):
        activations.calibrate(model, None)
