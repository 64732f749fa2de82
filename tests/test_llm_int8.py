"""qlearn.quant.llm_int8: vector-wise int8 plus the mixed-precision decomposition, against bitsandbytes."""

import pytest
import torch
from torch import nn

from qlearn.quant import llm_int8

bnb = pytest.importorskip("bitsandbytes")

BNB_DEQUANT = 6.200124e-05  # bitsandbytes 0.50's CPU dequantization constant (1/127^2 is 6.2000124e-05)


def _inputs(seed=0, tokens=96, cols=256, rows=128, outliers=(3, 77, 200)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens // 2, cols, generator=g)
    x[..., list(outliers)] *= 25  # outlier features, far beyond the 6.0 threshold
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=g) * 0.05)
        layer.bias.copy_(torch.randn(rows, generator=g))
    return x, layer


def _bnb_layer(layer, threshold):
    return llm_int8.to_bitsandbytes(nn.ModuleDict({"layer": layer}), threshold)["layer"]


def test_codes_scales_and_outlier_features_equal_bitsandbytes_exactly():
    x, layer = _inputs()
    X = x.reshape(-1, x.shape[-1])
    CA, SCA, cols = bnb.functional.int8_vectorwise_quant(X.half(), threshold=6.0)
    codes, absmax, outliers = llm_int8.quantize_rows(X, 6.0)
    assert torch.equal(codes, CA) and torch.equal(absmax, SCA) and torch.equal(outliers, cols)
    assert outliers.tolist() == [3, 77, 200]
    w = llm_int8.quantize_weight(layer.weight)
    ref = _bnb_layer(layer, 6.0)
    with torch.no_grad():
        ref(x)  # the first call moves the weight's codes into the layer's state
    assert torch.equal(w.codes, ref.state.CB) and torch.equal(w.absmax, ref.state.SCB)


@pytest.mark.parametrize("threshold", [6.0, None])
def test_linear_agrees_with_bitsandbytes_linear8bitlt(threshold):
    x, layer = _inputs(1)
    ref = _bnb_layer(layer, threshold)  # a Linear8bitLt from a copy of the layer's weights
    with torch.no_grad():
        got, expected = llm_int8.linear(x, layer.weight, threshold, layer.bias), ref(x)
    assert got.shape == expected.shape == (2, 48, 128) and got.dtype == torch.float32
    # The int8 codes are equal (test above); bitsandbytes' CPU path dequantizes with 6.200124e-05 where
    # 1/127^2 = 6.2000124e-05 (1.8e-5 larger), plus float32 rounding of the outlier term: measured
    # max |diff| / max |y| = 9e-6 on these inputs.
    torch.testing.assert_close(got, expected, rtol=3e-5, atol=3e-5 * expected.abs().max().item())


def test_with_bitsandbytes_constant_the_vector_wise_path_is_bit_for_bit(monkeypatch):
    x, layer = _inputs(2)
    ref = _bnb_layer(layer, None)
    monkeypatch.setattr(llm_int8, "_INV_127_SQUARED", BNB_DEQUANT)
    with torch.no_grad():
        assert torch.equal(llm_int8.linear(x, layer.weight, None, layer.bias), ref(x))


def test_the_decomposition_rescues_the_other_features_from_the_outliers():
    x, layer = _inputs(3)
    with torch.no_grad():
        exact = layer(x)
        error = {t: (llm_int8.linear(x, layer.weight, t, layer.bias) - exact).pow(2).mean().item() for t in (6.0, None)}
        # reference: int8 error of the weights alone (what is left once the outliers are out of the int8 product)
        w_only = (x @ llm_int8.quantize_weight(layer.weight).dequantize().T + layer.bias - exact).pow(2).mean().item()
    assert error[None] > 10 * error[6.0]  # measured 15x
    assert error[6.0] < 1.5 * w_only  # measured 1.15x: the int8 activations of the other features add little


def test_the_papers_float_outlier_weights_carry_the_outliers_exactly():
    x, layer = _inputs(4)
    x_out = torch.zeros_like(x)
    x_out[..., [3, 77, 200]] = x[..., [3, 77, 200]]  # only the outlier features: nothing goes through int8
    with torch.no_grad():
        exact = x_out @ layer.weight.T
        paper = llm_int8.linear(x_out, layer.weight, 6.0, outlier_weight="float")
        bnb_way = llm_int8.linear(x_out, layer.weight, 6.0)
    torch.testing.assert_close(paper, exact, rtol=0, atol=1e-5)  # float32 sums of 3 products of size ~25
    assert (bnb_way - exact).abs().max() > 1e-3  # the int8 weight's rounding (step ~1e-3) times x ~25


def test_int8_weight_is_a_quant_state():
    _, layer = _inputs()
    w = llm_int8.quantize_weight(layer.weight)
    assert w.codes.dtype == torch.int8 and w.bits_per_param() == 8 + 32 / 256
    # half a step, plus the float16 rounding of the weight that comes first (2^-11 relative)
    bound = w.absmax[:, None] / 127 / 2 + layer.weight.abs() * 2**-11
    assert ((w.dequantize() - layer.weight).abs() <= bound).all()
    assert "per-row (vector-wise)" in repr(w) and "bits=8" in repr(w)


def test_convert_replaces_every_linear_but_lm_head_and_matches_linear():
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(16, 8), "lm_head": nn.Linear(8, 4)})
    x = torch.randn(5, 16) * 4
    with torch.no_grad():
        expected = llm_int8.linear(x, model["proj"].weight, 6.0, model["proj"].bias)
    llm_int8.convert(model)
    assert isinstance(model["proj"], llm_int8.Int8Linear) and isinstance(model["lm_head"], nn.Linear)
    assert torch.equal(model["proj"](x), expected)
    assert "threshold=6.0" in repr(model["proj"])
    paper = llm_int8.convert(nn.ModuleDict({"proj": nn.Linear(16, 8)}), outlier_weight="float")["proj"]
    with torch.no_grad():
        assert torch.equal(paper(x), llm_int8.linear(x, paper.float_weight, 6.0, paper.bias, outlier_weight="float"))


def test_outlier_features_counts_the_columns_beyond_the_threshold():
    x = torch.zeros(4, 10)
    x[1, 2], x[3, 7], x[0, 5] = 6.0, -9.0, 5.99  # >= 6 counts (bitsandbytes' rule), 5.99 does not
    assert llm_int8.outlier_features(x).tolist() == [2, 7]


def test_bad_arguments_raise_clear_errors():
    x, layer = _inputs()
    for bad in (0, -1.0, 0.0):
        with pytest.raises(ValueError, match="threshold must be a positive number"):
            llm_int8.linear(x, layer.weight, bad)
    with pytest.raises(ValueError, match=r"x must be a float tensor \(\.\.\., 256\)"):
        llm_int8.linear(x[..., :100], layer.weight)
    with pytest.raises(ValueError, match="outlier_weight must be one of"):
        llm_int8.linear(x, layer.weight, outlier_weight="fp16")
    with pytest.raises(ValueError, match="outlier_weight='float' needs the float weight"):
        llm_int8.linear(x, llm_int8.quantize_weight(layer.weight), outlier_weight="float")
    with pytest.raises(ValueError, match="weight must be a 2-D float tensor"):
        llm_int8.quantize_weight(torch.ones(3))
