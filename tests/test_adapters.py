"""qlearn.adapters: identity at init, the Houlsby formula, parameter count, only adapters train, errors."""

import pytest
import torch
from torch import nn

from qlearn.adapters import AdaptedMLP, BottleneckAdapter, apply_adapters
from qlearn.modules import count_trainable


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def test_adapter_starts_as_identity():
    adapter = BottleneckAdapter(16, bottleneck=4)
    h = torch.randn(2, 5, 16)
    assert torch.equal(adapter(h), h)  # W_up = 0 and b_up = 0 exactly


def test_adapter_is_the_formula():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(16, bottleneck=4, activation="relu")
    adapter.up.weight.data.normal_()
    adapter.up.bias.data.normal_()
    h = torch.randn(3, 16)
    W_d, b_d, W_u, b_u = adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias
    expected = h + torch.relu(h @ W_d.T + b_d) @ W_u.T + b_u
    torch.testing.assert_close(adapter(h), expected, atol=1e-6, rtol=1e-6)  # same ops, fp32 rounding


def test_adapted_model_starts_equal_and_counts_parameters():
    model, ref = tiny_llama(), tiny_llama()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    assert apply_adapters(model, bottleneck=8) is model  # in place, returns the model
    assert count_trainable(model) == 2 * (2 * 32 * 8 + 8 + 32)  # two blocks of 2 d m + m + d
    assert all(isinstance(layer.mlp, AdaptedMLP) for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_only_adapters_get_gradients_and_they_change_the_output():
    model = apply_adapters(tiny_llama(), bottleneck=4)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".adapter." in n for n in grads)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == grads
    before = model(ids).logits.detach()
    model.model.layers[0].mlp.adapter.up.weight.data.fill_(0.1)
    assert not torch.allclose(model(ids).logits, before)


def test_adapter_keeps_a_bf16_stream_in_bf16():
    adapter = BottleneckAdapter(8, bottleneck=2)
    h = torch.randn(4, 8, dtype=torch.bfloat16)
    assert adapter(h).dtype == torch.bfloat16 and adapter.down.weight.dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_size=0), "hidden_size must be a positive int"),
    (dict(bottleneck=0), "bottleneck must be a positive int"),
    (dict(activation="tanh"), "activation must be one of"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BottleneckAdapter(**(dict(hidden_size=8) | kwargs))


def test_target_modules_by_name_suffix():
    model = apply_adapters(tiny_llama(), bottleneck=2, target_modules="layers.1.mlp")
    assert not isinstance(model.model.layers[0].mlp, AdaptedMLP)
    assert isinstance(model.model.layers[1].mlp, AdaptedMLP)
    assert count_trainable(model) == 2 * 32 * 2 + 2 + 32


def test_apply_adapters_errors():
    with pytest.raises(ValueError, match="config.hidden_size"):
        apply_adapters(nn.Linear(2, 2))
    model = apply_adapters(tiny_llama(), bottleneck=2)
    with pytest.raises(ValueError, match="adapted already"):
        apply_adapters(model, bottleneck=2)
    with pytest.raises(ValueError, match=r"no module matching target_modules=\['ffn'\]"):
        apply_adapters(tiny_llama(), target_modules=["ffn"])
    with pytest.raises(TypeError, match="target_modules must be a layer name or a list"):
        apply_adapters(tiny_llama(), target_modules=3)
