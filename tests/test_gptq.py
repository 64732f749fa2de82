"""qlearn.quant.gptq: error feedback beats RTN when inputs are correlated, equals it when they are not."""

import pytest
import torch

from qlearn.quant import gptq, rtn


def _layer(seed=0, rows=64, cols=128, n=1024):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, 16, generator=g)  # inputs driven by 16 hidden factors: strongly correlated
    x = torch.randn(n, 16, generator=g) @ mixing.T + 0.3 * torch.randn(n, cols, generator=g)
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x


def _output_error(w, w_hat, x):
    return ((x @ (w - w_hat).T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_output_error_is_below_rtn_with_correlated_inputs(bits, group_size):
    w, x = _layer()
    H = gptq.hessian(x)
    e_rtn = _output_error(w, rtn.quantize_rtn(w, bits, group_size).dequantize(), x)
    e_gptq = _output_error(w, gptq.gptq_quantize(w, H, bits, group_size).dequantize(), x)
    assert e_gptq < 0.6 * e_rtn  # measured ratio about 0.3 on this layer


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_rtn_when_the_hessian_is_diagonal(group_size, act_order):
    # A diagonal H: uncorrelated inputs, nothing to compensate; with act-order the columns are visited
    # in another order and must be put back.
    w, _ = _layer(seed=1)
    H = torch.diag(torch.linspace(1.0, 3.0, w.shape[1]))
    assert torch.equal(gptq.gptq_quantize(w, H, 3, group_size, act_order=act_order).dequantize(),
                       rtn.quantize_rtn(w, 3, group_size).dequantize())


def test_lazy_batches_give_the_same_result_as_one_column_at_a_time():
    w, x = _layer(seed=2)
    H = gptq.hessian(x)
    lazy = gptq.gptq_quantize(w, H, 4, 32, lazy_batch_size=128).dequantize()
    eager = gptq.gptq_quantize(w, H, 4, 32, lazy_batch_size=1).dequantize()
    # 1e-6: the same updates summed in another order (float32); no rounding decision flips here.
    torch.testing.assert_close(lazy, eager, atol=1e-6, rtol=0)


def test_act_order_helps_when_a_few_inputs_dominate():
    w, x = _layer(seed=3)
    x[:, :8] *= 10
    H = gptq.hessian(x)
    plain = _output_error(w, gptq.gptq_quantize(w, H, 3, act_order=False).dequantize(), x)
    ordered = _output_error(w, gptq.gptq_quantize(w, H, 3, act_order=True).dequantize(), x)
    assert ordered < plain


def test_dead_inputs_get_zero_weights_and_no_nan():
    w, x = _layer(seed=4)
    x[:, 5] = 0
    w_hat = gptq.gptq_quantize(w, gptq.hessian(x), 4).dequantize()
    assert torch.isfinite(w_hat).all() and torch.all(w_hat[:, 5] == 0)


def test_output_has_the_weight_dtype_and_shape():
    w, x = _layer(seed=5)
    w_hat = gptq.gptq_quantize(w.to(torch.bfloat16), gptq.hessian(x), 4, 32).dequantize()
    assert w_hat.dtype == torch.bfloat16 and w_hat.shape == w.shape


def test_hessian_is_2_xtx_over_n_and_positive_semidefinite():
    _, x = _layer(seed=6, n=200)
    H = gptq.hessian(x.view(10, 20, -1))  # (batch, tokens, features) is flattened
    torch.testing.assert_close(H, 2 * x.T @ x / 200, rtol=1e-5, atol=1e-5)  # float32 sum order
    assert torch.linalg.eigvalsh(H.double()).min() > -1e-4


def test_bad_arguments_raise_clear_errors():
    w, x = _layer()
    H = gptq.hessian(x)
    with pytest.raises(ValueError, match=r"H must be \(128, 128\)"):
        gptq.gptq_quantize(w, H[:64, :64], 4)
    with pytest.raises(ValueError, match="percdamp must be in"):
        gptq.gptq_quantize(w, H, 4, percdamp=1.5)
    with pytest.raises(ValueError, match="lazy_batch_size must be a positive int"):
        gptq.gptq_quantize(w, H, 4, lazy_batch_size=0)
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        gptq.gptq_quantize(w, H, 10)
    with pytest.raises(ValueError, match="x must be a tensor of shape"):
        gptq.hessian(torch.randn(5))
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        gptq.hessian(x)
