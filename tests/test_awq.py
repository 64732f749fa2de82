"""qlearn.quant.awq: activation-aware scales protect the input channels that carry large activations."""

import pytest
import torch

from qlearn.quant import awq, rtn


def _layer(seed=0, rows=64, cols=128, n=1024):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g)
    salient = torch.randperm(cols, generator=g)[:4]
    x[:, salient] *= 20  # a few input channels with much larger activations, as in LLMs
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x


def _output_error(w, w_hat, x):
    return ((x @ (w - w_hat).T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [None, 32])
def test_scale_search_beats_rtn_on_salient_channels(bits, group_size):
    w, x = _layer()
    state, _, alpha = awq.awq_quantize(w, x, bits, group_size, clip=False)
    w_hat = state.dequantize()
    assert 0 < alpha < 1
    assert _output_error(w, w_hat, x) < 0.8 * _output_error(w, rtn.quantize_rtn(w, bits, group_size).dequantize(), x)


def test_never_worse_than_rtn_on_the_calibration_data():
    # alpha = 0 (s = 1) is plain RTN and is on the grid, so the search cannot lose; here with no salient
    # channels at all.
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(32, 64, generator=g), torch.randn(512, 64, generator=g)
    w_hat = awq.awq_quantize(w, x, 3, clip=False)[0].dequantize()
    assert _output_error(w, w_hat, x) <= _output_error(w, rtn.quantize_rtn(w, 3).dequantize(), x) + 1e-7


def test_clip_search_lowers_the_error_further():
    w, x = _layer(seed=2)
    no_clip = awq.awq_quantize(w, x, 3, 32, clip=False)[0].dequantize()
    clipped = awq.awq_quantize(w, x, 3, 32, clip=True)[0].dequantize()
    assert _output_error(w, clipped, x) < _output_error(w, no_clip, x)


def test_scales_straddle_one_and_weight_keeps_dtype():
    w, x = _layer(seed=3)
    state, s, _ = awq.awq_quantize(w.to(torch.bfloat16), x, 4, 32)
    w_hat = state.dequantize()
    assert w_hat.dtype == torch.bfloat16 and w_hat.shape == w.shape and s.shape == (w.shape[1],)
    assert (s.max() * s.min()).sqrt().item() == pytest.approx(1.0, rel=1e-5)
    # the state stores the codes of W diag(s), and s itself, folded away, costs no bits
    assert torch.equal(state.input_scale, s) and state.bits_per_param() == 4 + 32 / 32


def test_clip_search_returns_a_state_on_the_clipped_grids():
    w, x = _layer(seed=4)
    state = awq.clip_search(w, x, 3, 32)
    assert state.group_size == 32 and state.q.max() <= 7 and state.scale.shape == (w.shape[0], 4, 1)
    # never worse than plain RTN on the output error (r = 1 is one of the candidates)
    assert _output_error(w, state.dequantize(), x) <= _output_error(w, rtn.quantize_rtn(w, 3, 32).dequantize(), x) + 1e-7


def test_activation_scale_is_the_mean_magnitude_per_channel():
    x = torch.tensor([[1.0, -2.0], [-3.0, 0.0]])
    assert torch.equal(awq.activation_scale(x.view(1, 2, 2)), torch.tensor([2.0, 1.0]))


def test_bad_arguments_raise_clear_errors():
    w, x = _layer()
    with pytest.raises(ValueError, match=r"x must be the layer's inputs, shape \(\.\.\., 128\)"):
        awq.awq_quantize(w, x[:, :64], 4)
    with pytest.raises(ValueError, match="n_grid must be a positive int"):
        awq.awq_quantize(w, x, 4, n_grid=0)
    with pytest.raises(ValueError, match="x must be a tensor of shape"):
        awq.activation_scale(torch.randn(3))
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        awq.activation_scale(x)
