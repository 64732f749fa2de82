"""qlearn.lora's variants against PEFT 0.21: rsLoRA, DoRA (forward, gradients, merge), PiSSA (exact and
fast SVD), QPiSSA, LoftQ (its defining property, PEFT's quantizer and decomposition), bad input."""

import copy
import logging

import pytest
import torch
from torch import nn

from qlearn.lora import LoRALinear, loftq_init, pissa_init
from qlearn.quant import nf4, quantize

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU backend notes about optional kernels
peft = pytest.importorskip("peft")


class One(nn.Module):
    """A model with one linear layer, the smallest thing get_peft_model wraps."""

    def __init__(self, d_in=64, d_out=48, bias=True):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.lin(x)


def pair(seed=0, bias=True, d_in=64, d_out=48, **flags):
    """(ours, PEFT's lora.Linear) on copies of one layer, with the same A, random B and (DoRA) magnitude.

    B = 0 makes every comparison pass trivially (PEFT's tests warn of this): B and m get random values."""
    torch.manual_seed(seed)
    model = One(d_in, d_out, bias)
    r, alpha = flags.pop("r", 4), flags.pop("alpha", 8)
    ours = LoRALinear(copy.deepcopy(model.lin), r, alpha, **flags)
    cfg = dict(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=flags.get("dropout", 0.0),
               use_rslora=flags.get("use_rslora", False), use_dora=flags.get("use_dora", False))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)).base_model.model.lin
    with torch.no_grad():
        ours.B.normal_(std=0.5)
        theirs.lora_A["default"].weight.copy_(ours.A)
        theirs.lora_B["default"].weight.copy_(ours.B)
        if ours.use_dora:
            ours.magnitude.mul_(torch.rand(d_out) + 0.5)
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    return ours, theirs


# PEFT's DoRA computes B A as lora_B(lora_A(I)).T, another GEMM than B @ A: its sums may round differently on
# another CPU (here they agree bit for bit); everything else is the same expression in the same order.
CLOSE = dict(atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("dropout, bias", [(0.0, True), (0.3, True), (0.3, False)])
def test_forward_equals_pefts_layer_in_eval_and_training(use_dora, use_rslora, dropout, bias):
    ours, theirs = pair(bias=bias, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora)
    assert ours.scaling == theirs.scaling["default"] == (8 / 2 if use_rslora else 8 / 4)
    x = torch.randn(3, 5, 64)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), **CLOSE)
    ours.train(), theirs.train()
    torch.manual_seed(1)
    y_ours = ours(x)
    torch.manual_seed(1)  # the same dropout mask (one nn.Dropout call each, on the same input)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, **CLOSE)


def test_dora_magnitude_starts_at_pefts_row_norms():
    torch.manual_seed(0)
    model = One()
    ours = LoRALinear(copy.deepcopy(model.lin), 4, 8, use_dora=True)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True)
    theirs = peft.get_peft_model(model, cfg)
    m_peft = theirs.base_model.model.lin.lora_magnitude_vector["default"].weight
    assert ours.magnitude.shape == (48,) and ours.magnitude.requires_grad
    assert torch.equal(ours.magnitude, m_peft)  # ||W||, B = 0: the same norm of the same rows
    assert torch.equal(ours.magnitude, model.lin.weight.norm(dim=1))
    x = torch.randn(4, 64)
    assert torch.equal(ours(x), model.lin(x))  # m / ||W|| = 1 and B = 0: DoRA starts as the base layer


def test_dora_gradients_equal_pefts_so_the_norm_is_detached_as_there():
    ours, theirs = pair(use_dora=True)
    x = torch.randn(6, 64)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for mine, peft_param in [(ours.A, theirs.lora_A["default"].weight),
                             (ours.B, theirs.lora_B["default"].weight),
                             (ours.magnitude, theirs.lora_magnitude_vector["default"].weight)]:
        torch.testing.assert_close(mine.grad, peft_param.grad, atol=1e-5, rtol=1e-5)  # CLOSE, over 6 rows
    # the norm detached (DoRA Sec. 4.3): without it the gradient of B would differ
    layer = copy.deepcopy(ours)
    layer.zero_grad()
    w = layer.base.weight
    n = torch.linalg.norm(w + layer.scaling * layer.B @ layer.A, dim=1)  # not detached
    full = (layer.magnitude / n).view(-1, 1) * (w + layer.scaling * layer.B @ layer.A)
    (x @ full.T + layer.base.bias).square().sum().backward()
    assert not torch.allclose(layer.B.grad, ours.B.grad, atol=1e-3)


def test_dora_merge_equals_pefts_and_unmerge_restores():
    ours, theirs = pair(use_dora=True)
    w0 = ours.base.weight.detach().clone()
    x = torch.randn(5, 64)
    y = ours(x)
    plain = ours.merge()
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=1e-5)  # m (W + sBA) / n x vs the two-term forward
    merged_peft = copy.deepcopy(theirs)
    merged_peft.merge()
    torch.testing.assert_close(plain.weight, merged_peft.base_layer.weight, **CLOSE)
    ours.merge_()
    assert torch.equal(ours(x), plain(x))  # the same merged weight, in place
    ours.unmerge_()
    # W' / (m / n) - s B A: a few roundings of |W| + |sBA| (~1), so within a few float32 ulps of 1
    torch.testing.assert_close(ours.base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_equals_pefts_adapter_and_residual(init):
    torch.manual_seed(0)
    model = One(128, 96)
    w = model.lin.weight.detach().clone()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], init_lora_weights=init)
    theirs = peft.get_peft_model(copy.deepcopy(model), cfg)
    layer = theirs.base_model.model.lin
    niter = None if init == "pissa" else 4
    if niter is not None:  # randomized SVD: run PEFT's and ours from the same generator state
        layer.base_layer.weight.data = w.clone()
        torch.manual_seed(5)
        layer.pissa_init("default", init)
        torch.manual_seed(5)
    A, B, residual = pissa_init(w, 8, 2.0, niter)
    # the products, so that the SVD's sign freedom cannot matter (here even A and B agree bit for bit)
    A_peft, B_peft = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(B @ A, B_peft @ A_peft, **CLOSE)
    torch.testing.assert_close(residual, layer.base_layer.weight, **CLOSE)
    ours = LoRALinear(copy.deepcopy(model.lin), 8, 16, init=init)
    x = torch.randn(4, 128)
    # W_res x + s B A x = W x up to float32 rounding of two products and a sum
    torch.testing.assert_close(ours(x), model.lin(x), atol=1e-5, rtol=1e-5)
    if niter is None:
        U, S, Vh = torch.linalg.svd(w)
        torch.testing.assert_close(2.0 * ours.B @ ours.A, U[:, :8] * S[:8] @ Vh[:8], atol=1e-5, rtol=1e-5)


def spectral_weight(out=128, d_in=256, seed=0):
    """A weight with a decaying spectrum and a few large singular directions, as trained LLM weights have."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out, out, generator=g))
    V, _ = torch.linalg.qr(torch.randn(d_in, out, generator=g))
    S = 0.02 * (torch.arange(1, out + 1).float() ** -0.5)
    S[:4] *= 20  # a few outstanding directions
    return (U * S) @ V.T


@pytest.mark.parametrize("bits", [4, 2])
def test_qpissa_quantizes_the_residual_with_less_error(bits):
    w = spectral_weight()
    quant = ((lambda t: nf4.quantize_nf4(t, 64).dequantize()) if bits == 4
             else (lambda t: quantize(t, 2, symmetric=False, group_size=64).dequantize()))
    A, B, residual = pissa_init(w, 8, 1.0)
    plain = (w - quant(w)).norm()
    qpissa = (w - (quant(residual) + B @ A)).norm()
    assert qpissa < 0.9 * plain, (bits, qpissa.item(), plain.item())


@pytest.mark.parametrize("bits", [4, 2])
def test_loftq_error_falls_with_iterations_and_beats_qloras_init(bits):
    w = spectral_weight(seed=1)
    q_w = nf4.quantize_nf4(w, 64) if bits == 4 else quantize(w, 2, symmetric=False, group_size=64)
    qlora = (w - q_w.dequantize()).norm().item()  # QLoRA's init: Q = quant(W), B = 0
    q, A, B, errors = loftq_init(w, 8, 2.0, bits, iters=3)
    assert len(errors) == 3 and errors[0] < qlora  # one iteration: the adapter already holds SVD_r(W - Q)
    assert errors[2] < errors[1] < errors[0], errors  # (not guaranteed forever: each Q re-fits its grid)
    assert (w - (q + 2.0 * B @ A)).norm().item() == errors[-1]  # Q, A, B: the last iteration's


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_equals_pefts_nf4_quantizer_and_decomposition_at_scaling_1(iters):
    """PEFT's loftq_init moves the weight to CUDA or XPU (hard-coded), so on the CPU its two building blocks
    run here in its own order: bitsandbytes' NF4 round trip (Params4bit, blocks of 64) and
    `_low_rank_decomposition`. The full function runs in the GPU test below."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.utils.loftq_utils import _low_rank_decomposition

    w = spectral_weight(96, 128, seed=2)
    res = w.clone()
    for i in range(iters):  # peft/utils/loftq_utils.py, loftq_init's loop
        qweight = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False, quant_type="nf4")
        qweight = qweight.to("cpu")  # quantizes
        q_peft = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
        low = _low_rank_decomposition(w - q_peft, reduced_rank=8)
        if i + 1 == iters:
            break
        res = w - low["L"] @ low["R"]
    q, A, B, _ = loftq_init(w, 8, 1.0, 4, iters)
    assert torch.equal(q, q_peft)  # NF4: qlearn.quant.nf4 is bitsandbytes bit for bit
    torch.testing.assert_close(B @ A, low["L"] @ low["R"], **CLOSE)  # the same SVD, sqrt(S) split the same


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PEFT's loftq_init runs only on CUDA or XPU "
                    "(peft/utils/loftq_utils.py hard-codes the device); the CPU test above checks its parts")
def test_loftq_equals_pefts_loftq_init_on_a_gpu():
    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    w = spectral_weight(96, 128, seed=2).cuda()
    # One iteration quantizes W itself: the NF4 values are equal bit for bit.
    q_peft, _, _ = peft_loftq_init(w, num_bits=4, reduced_rank=8, num_iter=1)
    q, _, _, _ = loftq_init(w, 8, 1.0, 4, 1)
    assert torch.equal(q, q_peft)
    # Two iterations quantize W - BA, whose float32 rounding follows cuSOLVER's SVD and each side's order of
    # operations: measured on an H200 (torch 2.11), 160 of 12,288 values differ, by at most 1.9e-9 (an ulp of
    # values near 0.005 dequantized through the block's absmax); B @ A within 6e-6.
    q_peft, A_peft, B_peft = peft_loftq_init(w, num_bits=4, reduced_rank=8, num_iter=2)
    q, A, B, _ = loftq_init(w, 8, 1.0, 4, 2)
    torch.testing.assert_close(q, q_peft, atol=1e-8, rtol=0)
    assert (q != q_peft).float().mean() < 0.05, f"{int((q != q_peft).sum())} of {q.numel()} values differ"
    torch.testing.assert_close(B @ A, B_peft @ A_peft, atol=1e-5, rtol=1e-5)  # cuSOLVER's SVD, float32


def test_loftq_layer_starts_closer_to_the_float_layer_than_qlora():
    torch.manual_seed(0)
    base = nn.Linear(128, 96)
    base.weight.data = spectral_weight(96, 128, seed=3)
    layer = LoRALinear(copy.deepcopy(base), 8, 16, init="loftq", loftq_bits=2, loftq_iter=2)
    q_only = copy.deepcopy(base)
    q_only.weight.data = quantize(base.weight.data, 2, symmetric=False, group_size=64).dequantize()
    x = torch.randn(32, 128)
    with torch.no_grad():
        assert (layer(x) - base(x)).norm() < 0.9 * (q_only(x) - base(x)).norm()
    # the base now holds Q itself (PEFT's base_layer.weight): requantizing it changes nothing
    q = layer.base.weight.data
    assert torch.equal(quantize(q, 2, symmetric=False, group_size=64).dequantize(), q)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(init="kaiming"), ValueError, r"init must be one of \('default', 'pissa', 'pissa_niter_<k>',"),
    (dict(init="olora"), ValueError, "PEFT's 'olora' is not implemented in qlearn"),
    (dict(init="pissa_niter_x"), ValueError, "init must be one of"),
    (dict(init=True), ValueError, "init must be one of"),
    (dict(use_dora=1), TypeError, "use_dora must be True or False"),
    (dict(use_rslora="yes"), TypeError, "use_rslora must be True or False"),
    (dict(init="loftq", loftq_bits=1), ValueError, "loftq_bits must be an int in 2..8"),
    (dict(init="loftq", loftq_iter=0), ValueError, "loftq_iter must be a positive int"),
    (dict(r=5, init="pissa"), ValueError, r"PiSSA needs r <= min\(out, in\) = 4"),
])
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRALinear(nn.Linear(8, 4), **kwargs)


def test_pissa_and_loftq_need_a_float_base():
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    q = q.to("cpu")
    with pytest.raises(ValueError, match="needs the full-precision weight"):
        LoRALinear(q, 4, 8, init="pissa")
    with pytest.raises(ValueError, match="scaling must be a finite number > 0"):
        loftq_init(torch.randn(8, 64), 2, scaling=0.0)
    with pytest.raises(ValueError, match="need in_features divisible by 64"):
        loftq_init(torch.randn(8, 48), 2, bits=2)
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        loftq_init(torch.randn(8, 64), 2, bits=9)
    with pytest.raises(ValueError, match="iters must be a positive int"):
        loftq_init(torch.randn(8, 64), 2, iters=0)
    with pytest.raises(ValueError, match=r"LoftQ needs r <= min\(out, in\) = 8"):
        loftq_init(torch.randn(8, 64), 9)
