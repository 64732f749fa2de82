"""qlearn.quant.qat: fake quantization and its STE/LSQ gradients against torch, QATLinear, prepare/convert."""

import copy
import math

import pytest
import torch
from torch import nn

from qlearn.quant import QATLinear, QTensor, convert, fake_quantize, prepare_qat, quantize
from qlearn.quant.linear import compute_scale_zero_point, qrange
from qlearn.quant.qat import lsq_grad_scale

BITS = [2, 3, 4, 8]


def _grad(fn, x, g):
    """(fn(x), d <fn(x), g> / dx) for a fresh leaf copy of x."""
    x = x.clone().requires_grad_()
    y = fn(x)
    (y * g).sum().backward()
    return y.detach(), x.grad


def _shrunk(x, bits, symmetric, **kw):
    """A min-max scale shrunk to 0.5x (so that some values clamp, at 2 bits too) and its zero point."""
    scale, zp = compute_scale_zero_point(x, bits, symmetric, clip_ratio=0.5, **kw)
    return scale, zp


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_forward_and_gradient_equal_torch(bits, symmetric):
    torch.manual_seed(bits)
    x, g = torch.randn(64, 48) * 2, torch.randn(64, 48)
    scale, zp = _shrunk(x, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    ours = _grad(lambda t: fake_quantize(t, bits, symmetric, scale=scale, zero_point=zp), x, g)
    theirs = _grad(lambda t: torch.fake_quantize_per_tensor_affine(t, scale.item(), int(zp), qmin, qmax), x, g)
    assert torch.equal(ours[0], theirs[0])  # same float ops in the same order: bit for bit
    assert torch.equal(ours[1], theirs[1])
    assert 0 < (ours[1] == 0).sum() < x.numel() // 2, "the shrunk range should clamp some values, not most"


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_forward_and_gradient_equal_torch(bits, symmetric, axis):
    torch.manual_seed(10 + bits)
    x, g = torch.randn(24, 40) * torch.rand(24, 1) * 3, torch.randn(24, 40)
    scale, zp = _shrunk(x, bits, symmetric, axis=axis)
    qmin, qmax = qrange(bits, symmetric)
    ours = _grad(lambda t: fake_quantize(t, bits, symmetric, axis=axis, scale=scale, zero_point=zp), x, g)
    theirs = _grad(lambda t: torch.fake_quantize_per_channel_affine(
        t, scale.flatten(), zp.flatten().int(), axis, qmin, qmax), x, g)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_ties_round_half_to_even_like_torch():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5])  # exact ties at scale 1
    ours = fake_quantize(x, 4, scale=torch.tensor(1.0))
    theirs = torch.fake_quantize_per_tensor_affine(x, 1.0, 0, -7, 7)
    assert ours.tolist() == theirs.tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0]


def test_gradient_mask_uses_the_rounded_code_inclusive():
    # 3-bit symmetric, scale 1: codes -3..3. 3.49 rounds to 3 (inside: gradient 1); 3.5 is a tie that
    # rounds to the even 4 (clamped: gradient 0); 2.5 rounds to 2 (inside)
    x = torch.tensor([-3.6, -3.5, -3.49, -2.5, 2.5, 3.49, 3.5, 3.6])
    ours = _grad(lambda t: fake_quantize(t, 3, scale=torch.tensor(1.0)), x, torch.ones(8))
    theirs = _grad(lambda t: torch.fake_quantize_per_tensor_affine(t, 1.0, 0, -3, 3), x, torch.ones(8))
    assert ours[1].tolist() == theirs[1].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert ours[0].tolist() == theirs[0].tolist() == [-3.0, -3.0, -3.0, -2.0, 2.0, 3.0, 3.0, 3.0]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_min_max_fake_quantize_equals_quantize_dequantize(bits, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(8, 32)
    for kw in ({}, {"axis": 0}, {"axis": -1}, {"group_size": 8}):
        assert torch.equal(fake_quantize(x, bits, symmetric, **kw), quantize(x, bits, symmetric, **kw).dequantize())


def test_per_group_equals_per_channel_of_the_grouped_view():
    torch.manual_seed(0)
    x, g = torch.randn(6, 32), torch.randn(6, 32)
    scale, zp = _shrunk(x, 3, False, group_size=8)  # (6, 4, 1)
    ours = _grad(lambda t: fake_quantize(t, 3, False, group_size=8, scale=scale, zero_point=zp), x, g)
    theirs = _grad(lambda t: torch.fake_quantize_per_channel_affine(
        t.reshape(24, 8), scale.flatten(), zp.flatten().int(), 0, 0, 7).reshape(6, 32), x, g)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_min_max_scale_passes_every_gradient():
    # with the min-max scale nothing is clamped, so the STE passes the gradient everywhere
    x = torch.randn(100)
    _, grad = _grad(lambda t: fake_quantize(t, 3), x, torch.full((100,), 0.5))
    assert torch.equal(grad, torch.full((100,), 0.5))


def test_bf16_input_keeps_its_dtype():
    x = torch.randn(4, 16).bfloat16().requires_grad_()
    y = fake_quantize(x, 4, axis=0)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16
    assert torch.equal(y, quantize(x.detach(), 4, axis=0).dequantize())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_scale_gradient_equals_torch_learnable_fake_quant(bits, symmetric):
    torch.manual_seed(bits)
    x, g = torch.randn(32, 16) * 2, torch.randn(32, 16)
    scale, zp = _shrunk(x, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    factor = lsq_grad_scale(x.numel(), bits, symmetric)
    s1 = scale.reshape(1).clone().requires_grad_()
    y1 = _grad(lambda t: fake_quantize(t, bits, symmetric, scale=s1, zero_point=zp.reshape(1)), x, g)
    s2 = scale.reshape(1).clone().requires_grad_()
    y2 = _grad(lambda t: torch._fake_quantize_learnable_per_tensor_affine(
        t, s2, zp.reshape(1).clone(), qmin, qmax, factor), x, g)
    assert torch.equal(y1[0], y2[0]) and torch.equal(y1[1], y2[1])
    # the scale gradient is a sum over 512 values: float32 summation order differs (~1e-6 relative)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-6)


def test_lsq_per_channel_gradient_equals_torch():
    torch.manual_seed(1)
    x, g = torch.randn(8, 20) * torch.rand(8, 1), torch.randn(8, 20)
    scale, _ = _shrunk(x, 4, True, axis=0)  # (8, 1)
    s1 = scale.clone().requires_grad_()
    _grad(lambda t: fake_quantize(t, 4, axis=0, scale=s1, grad_factor=0.25), x, g)
    s2 = scale.flatten().clone().requires_grad_()
    _grad(lambda t: torch._fake_quantize_learnable_per_channel_affine(t, s2, torch.zeros(8), 0, -7, 7, 0.25), x, g)
    torch.testing.assert_close(s1.grad.flatten(), s2.grad, rtol=1e-5, atol=1e-6)  # summation order


def test_lsq_grad_scale_formula():
    assert lsq_grad_scale(1024, 4) == pytest.approx(1 / math.sqrt(1024 * 7))
    assert lsq_grad_scale(100, 8, symmetric=False) == pytest.approx(1 / math.sqrt(100 * 255))


def test_default_grad_factor_uses_values_per_scale():
    x = torch.randn(4, 25)
    scale, _ = compute_scale_zero_point(x, 4, axis=0)
    s1, s2 = scale.clone().requires_grad_(), scale.clone().requires_grad_()
    fake_quantize(x, 4, axis=0, scale=s1).sum().backward()
    fake_quantize(x, 4, axis=0, scale=s2, grad_factor=1 / math.sqrt(25 * 7)).sum().backward()
    assert torch.equal(s1.grad, s2.grad)


# ---- QATLinear, prepare_qat, convert ------------------------------------------------------------

def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("kw", [{}, {"axis": None}, {"group_size": 8}, {"symmetric": False},
                                {"learn_scale": True}, {"learn_scale": True, "symmetric": False, "group_size": 4}])
def test_qat_linear_forward_uses_the_fake_quantized_weight(kw):
    lin = _mlp()[0]
    layer = QATLinear.from_linear(lin, 3, **kw)
    assert layer.weight is lin.weight and layer.bias is lin.bias  # shared, not copied
    x = torch.randn(5, 16)
    axis = None if "group_size" in kw else kw.get("axis", 0)
    w_hat = quantize(lin.weight.detach(), 3, kw.get("symmetric", True), axis, kw.get("group_size")).dequantize()
    torch.testing.assert_close(layer(x), x @ w_hat.T + lin.bias, rtol=0, atol=1e-6)  # matmul order only


def test_qat_linear_trains_weights_and_lsq_scale():
    layer = QATLinear.from_linear(nn.Linear(16, 8), 3, learn_scale=True)
    params = dict(layer.named_parameters())
    assert set(params) == {"weight", "bias", "weight_scale"}
    layer(torch.randn(4, 16)).pow(2).sum().backward()
    assert params["weight"].grad.abs().sum() > 0 and params["weight_scale"].grad.abs().sum() > 0
    assert params["weight_scale"].grad.shape == (8, 1)


def test_activation_fake_quantization():
    layer = QATLinear.from_linear(nn.Linear(16, 8), 8, act_bits=4)
    x = torch.randn(3, 16)
    expected = nn.functional.linear(quantize(x, 4).dequantize(), layer.quantized_weight(), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    per_token = QATLinear.from_linear(nn.Linear(16, 8), 8, act_bits=4, act_group_size=16)
    expected = nn.functional.linear(quantize(x, 4, group_size=16).dequantize(), per_token.quantized_weight(),
                                    per_token.bias)
    torch.testing.assert_close(per_token(x), expected, rtol=0, atol=0)


def test_prepare_qat_replaces_linears_and_excludes_by_name():
    model = nn.ModuleDict({"body": _mlp(), "lm_head": nn.Linear(10, 4)})
    out = prepare_qat(model, 4)
    assert out is model
    assert [type(m).__name__ for m in model["body"]] == ["QATLinear", "ReLU", "QATLinear", "ReLU", "QATLinear"]
    assert type(model["lm_head"]) is nn.Linear
    prepare_qat(model, 4, exclude=())  # a second call wraps only what is still a plain nn.Linear
    assert type(model["lm_head"]) is QATLinear and type(model["body"][0]) is QATLinear
    # the rule is qlearn.modules' (PEFT's): a whole name or a name suffix, not any part of a name
    nested = nn.ModuleDict({"lm_head": nn.ModuleDict({"proj": nn.Linear(4, 4)}), "head": nn.Linear(4, 4)})
    prepare_qat(nested, 4, exclude=("lm_head.proj",))
    assert type(nested["lm_head"]["proj"]) is nn.Linear and type(nested["head"]) is QATLinear


@pytest.mark.parametrize("kw", [{}, {"group_size": 8, "symmetric": False}, {"learn_scale": True}])
def test_convert_gives_the_qat_outputs_and_grid_weights(kw):
    model = prepare_qat(_mlp(), 3, **kw)
    if kw.get("learn_scale"):  # move the scales off their start so the test sees learned values
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, QATLinear):
                    m.weight_scale.mul_(0.8)
    x = torch.randn(7, 16)
    with torch.no_grad():
        expected = model(x)
    assert convert(model) is model
    qts = model.quant_report.states
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))
    assert torch.equal(model(x).detach(), expected)  # same weights bit for bit, same ops
    assert set(qts) == {"0", "2", "4"} and all(isinstance(q, QTensor) for q in qts.values())
    for name, qt in qts.items():
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(qt.dequantize(), w)
        qmin, qmax = qrange(3, kw.get("symmetric", True))
        assert qt.q.min() >= qmin and qt.q.max() <= qmax
        levels = (qt.q.float().reshape(qt.shape[0], -1).unique(dim=None)).numel()
        assert levels <= 2**3


def test_convert_refuses_activation_quantization_unless_told():
    model = prepare_qat(_mlp(), 4, act_bits=8)
    with pytest.raises(ValueError, match="drop_act_quant=True"):
        convert(copy.deepcopy(model))
    converted = convert(model, drop_act_quant=True)
    assert not any(isinstance(m, QATLinear) for m in converted.modules())


@pytest.fixture
def one_thread():
    # matrices this small gain nothing from threads, and a busy machine makes OpenMP's waits slow
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_qat_recovers_accuracy_that_ptq_loses(one_thread):
    # a toy regression: QAT fine-tuning at 2 bits lowers the loss below the PTQ model's
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = torch.sin(x @ torch.randn(16, 4))
    model = _mlp()[:3]
    model.append(nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    ptq = convert(prepare_qat(copy.deepcopy(model), 2))
    qat = prepare_qat(copy.deepcopy(model), 2)
    opt = torch.optim.Adam(qat.parameters(), 1e-3)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.mse_loss(qat(x), y).backward()
        opt.step()
    qat = convert(qat)
    with torch.no_grad():
        fp, lp, lq = (nn.functional.mse_loss(m(x), y).item() for m in (model, ptq, qat))
    assert fp < lq < lp and (lp - lq) > 0.5 * (lp - fp), (fp, lp, lq)


@pytest.mark.parametrize("zero_point", [3, 5, 7])
def test_convert_equals_the_qat_forward_at_exact_ties_with_odd_zero_points(zero_point):
    # The issue's case: a 1x4 weight, 4 bits, asymmetric, per channel: scale 0.125 and zero point 3, with
    # 0.0625 and 0.3125 exactly half-way between two grid points. The QAT forward rounds round(x/s) + z
    # (torch.fake_quantize's rule), which convert must follow: [-0.375, 0.0, 0.25, 1.5], not
    # [-0.375, 0.125, 0.375, 1.5] (round(x/s + z), torch.quantize_per_tensor's).
    scale = 0.125
    z = zero_point
    lo, hi = -z * scale, (15 - z) * scale  # a row whose min-max grid has exactly this scale and zero point
    row = torch.tensor([[lo, lo + 3.5 * scale, lo + 5.5 * scale, hi]])
    layer = nn.Sequential(nn.Linear(4, 1, bias=False))
    layer[0].weight.data = row.clone()
    prepare_qat(layer, bits=4, symmetric=False, axis=0, exclude=())
    x = torch.eye(4)
    with torch.no_grad():
        qat_out = layer(x)
    convert(layer)
    state = layer.quant_report.states["0"]
    assert state.zero_point.item() == z and state.scale.item() == scale
    with torch.no_grad():
        assert torch.equal(layer(x), qat_out)
    torch_fq = torch.fake_quantize_per_channel_affine(row, torch.tensor([scale]), torch.tensor([z], dtype=torch.int32),
                                                      0, 0, 15)
    assert torch.equal(layer[0].weight, torch_fq)


def test_convert_of_the_issues_weight_gives_the_qat_values():
    layer = nn.Sequential(nn.Linear(4, 1, bias=False))
    layer[0].weight.data = torch.tensor([[-0.375, 0.0625, 0.3125, 1.5]])
    prepare_qat(layer, bits=4, symmetric=False, axis=0, exclude=())
    convert(layer)
    assert layer[0].weight.tolist() == [[-0.375, 0.0, 0.25, 1.5]]


# ---- errors -------------------------------------------------------------------------------------

def test_errors_name_the_parameter():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits must be an int in 2..8, got 9"):
        fake_quantize(x, 9)
    with pytest.raises(ValueError, match="bits must be an int in 2..8, got 1"):
        QATLinear(8, 4, bits=1)
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        prepare_qat(_mlp(), 4, act_bits=16)
    with pytest.raises(TypeError, match="x must be a floating-point torch.Tensor"):
        fake_quantize(torch.ones(3, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="NaN or inf"):
        fake_quantize(torch.tensor([1.0, float("nan")]), 4)
    with pytest.raises(ValueError, match="NaN or inf"):
        fake_quantize(torch.tensor([1.0, float("inf")]), 4, scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        fake_quantize(x, 4, scale=torch.tensor(0.0))
    with pytest.raises(TypeError, match="scale must be a floating-point torch.Tensor"):
        fake_quantize(x, 4, scale=0.1)
    with pytest.raises(ValueError, match="zero_point must be 0 when symmetric=True"):
        fake_quantize(x, 4, scale=torch.tensor(0.1), zero_point=torch.tensor(3.0))
    with pytest.raises(ValueError, match=r"zero_point must hold integers in \[0, 15\]"):
        fake_quantize(x, 4, False, scale=torch.tensor(0.1), zero_point=torch.tensor(2.5))
    with pytest.raises(ValueError, match="zero_point was given without scale"):
        fake_quantize(x, 4, zero_point=torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"scale of shape \(3,\) does not broadcast"):
        fake_quantize(x, 4, scale=torch.ones(3))
    with pytest.raises(ValueError, match="group_size must be a positive int dividing"):
        fake_quantize(x, 4, group_size=3)
    with pytest.raises(ValueError, match="axis must be None or an int"):
        fake_quantize(x, 4, axis=2)
    with pytest.raises(ValueError, match="axis must be 0 .per output channel. or None"):
        QATLinear(8, 4, axis=1)
    with pytest.raises(ValueError, match=r"group_size must be a positive int dividing in_features \(8\)"):
        QATLinear(8, 4, group_size=3)
    with pytest.raises(ValueError, match="act_group_size must be None or a positive int"):
        QATLinear(8, 4, act_bits=8, act_group_size=5)
    with pytest.raises(RuntimeError, match=r"call init_scale\(\)"):
        QATLinear(8, 4, learn_scale=True, device="meta").quantized_weight()
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        QATLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="num_values must be a positive int"):
        lsq_grad_scale(0, 4)
    with pytest.raises(ValueError, match="model has no nn.Linear layer"):
        prepare_qat(nn.Sequential(nn.ReLU()), 4)
    with pytest.raises(TypeError, match="exclude must be a collection of names"):
        prepare_qat(_mlp(), 4, exclude="lm_head")
    with pytest.raises(TypeError, match=r"use QATLinear.from_linear\(linear, bits\)"):
        prepare_qat(nn.Linear(4, 4), 4)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        prepare_qat("model", 4)
    with pytest.raises(ValueError, match="model has no QATLinear layer"):
        convert(_mlp())
