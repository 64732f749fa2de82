"""qlearn.models: bitsandbytes' CPU repacking trap (documented as measured) and keep_standard_layout."""

import logging
import warnings

import pytest
import torch
from torch import nn

from qlearn.models import is_repacked, keep_standard_layout

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU backend notes about optional kernels
bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")


def _layer(seed=0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    w = torch.randn(64, 128) * 0.02
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    return layer.to("cpu"), w


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, _ = _layer()
        self.plain = nn.Linear(4, 4)


def _eval_then_train_grad(layer) -> torch.Tensor | None:
    """Run the layer once in eval mode without gradients, then once in training mode; the input's grad."""
    x = torch.randn(3, 128)
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    x = x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "autograd kernel was not registered" on the repacked path
        layer(x).sum().backward()
    return x.grad


def test_bitsandbytes_repacks_on_avx512bf16_cpus_and_then_drops_the_input_gradient():
    # Documents bitsandbytes 0.50.2; if this fails after an upgrade, the trap may be fixed upstream.
    layer, _ = _layer()
    before = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    grad = _eval_then_train_grad(layer)
    if bnbF.has_avx512bf16():
        assert is_repacked(layer)
        assert grad is None  # no gradient reaches the input: LoRA layers below would train wrongly
        misread = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert (misread - before).abs().max() > 1e-2  # the tiled layout is read as the standard one
    else:
        assert not is_repacked(layer) and grad is not None


def test_keep_standard_layout_keeps_the_gradient_and_the_weights():
    model = Wrapper()
    assert keep_standard_layout(model) == 1
    layer = model.q
    before = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    reference = x.grad.clone()
    grad = _eval_then_train_grad(layer)
    assert not is_repacked(layer) and layer.weight.quant_state.nested  # still double-quantized
    assert grad is not None and grad.shape == reference.shape
    # the input gradient is x-independent for a linear layer: W^T 1, the same as before evaluating
    torch.testing.assert_close(grad[0], reference[0], rtol=0, atol=0)
    assert torch.equal(bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state), before)


def test_keep_standard_layout_errors():
    with pytest.raises(ValueError, match="no bitsandbytes Linear4bit layer"):
        keep_standard_layout(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        keep_standard_layout("model")
    layer, _ = _layer()
    layer.weight.quant_state.packing_format_for_cpu = True  # as bitsandbytes marks a repacked layer
    with pytest.raises(ValueError, match="already repacked"):
        keep_standard_layout(layer)
