"""qlearn.lora: LoRALinear against PEFT's LoRA layer, merge/unmerge invariants, apply_lora, errors."""

import copy
import math

import pytest
import torch
from torch import nn

from qlearn.lora import LoRALinear, apply_lora, lora_layers, merge_lora
from qlearn.modules import count_trainable

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def randomize_B(model, seed: int = 1):
    """B = 0 makes every merge test pass trivially (PEFT's tests warn of this): give B values first."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.B.data = torch.randn(layer.B.shape, generator=g) * 0.1


def test_starts_equal_to_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(copy.deepcopy(base), r=4, alpha=8)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))  # B = 0 exactly, so the update is exactly 0


def test_init_matches_pytorch_kaiming_uniform_a_sqrt5():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(100, 10), r=8)
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=sqrt(5)) on fan_in=100: gain*sqrt(3/fan_in) = 1/sqrt(fan_in)
    assert layer.A.shape == (8, 100) and layer.B.shape == (10, 8)
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.B) == 0
    assert layer.scaling == 2.0


def test_forward_is_the_formula():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=12)
    layer.B.data.normal_()
    x = torch.randn(2, 3, 16)
    expected = x @ layer.base.weight.T + layer.base.bias + 3.0 * (x @ layer.A.T @ layer.B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # fp32 summation order


def test_only_A_and_B_train():
    layer = LoRALinear(nn.Linear(16, 8), r=2)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["A", "B"]
    assert count_trainable(layer) == 2 * (16 + 8)


def test_same_A_B_gives_pefts_output_and_merged_weights():
    from peft import LoraConfig, get_peft_model

    ours, theirs = tiny_llama(), tiny_llama()
    apply_lora(ours, TARGETS, r=4, alpha=8)
    randomize_B(ours)
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    peft_layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(peft_layers) == len(lora_layers(ours)) == 14
    for name, layer in lora_layers(ours).items():
        peft_layer = peft_layers["base_model.model." + name]
        assert peft_layer.scaling["default"] == layer.scaling
        peft_layer.lora_A["default"].weight.data.copy_(layer.A.data)
        peft_layer.lora_B["default"].weight.data.copy_(layer.B.data)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # same kernels (F.linear vs @ .T), same order: equal to float32 rounding of a reordered sum
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)
    merge_lora(ours)
    merged = theirs.merge_and_unload()
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), merged.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6)  # W + s*B@A, one fp32 rounding each


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_output_equals_unmerged_and_unmerge_restores(seed, dtype):
    torch.manual_seed(seed)
    out_f, in_f, r = [(8, 16, 1), (33, 7, 3), (64, 64, 8), (5, 40, 2), (16, 16, 16)][seed]
    base = nn.Linear(in_f, out_f).to(dtype)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=r, alpha=2 * r)
    layer.B.data.normal_(std=0.5)
    x = torch.randn(4, in_f, dtype=dtype)
    y = layer(x)
    plain = layer.merge()
    assert type(plain) is nn.Linear and plain.weight.dtype == dtype
    # fp32: reassociated sums (~1e-6); bf16: W + dW rounded to 8 mantissa bits, x@W' differs by ~2 ulps
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(plain(x), y, **tol)
    layer.merge_()
    assert layer.merged and torch.equal(layer(x), plain(x))  # same merged weight, same layer
    layer.unmerge_()
    # (W + d) - d: one rounding each way, so within 1 ulp of |W| + |d| (fp32 2^-23, bf16 2^-8)
    ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-8
    bound = ulp * (w0.float().abs() + layer.delta_weight().abs()) * 2
    assert ((base.weight.float() - w0.float()).abs() <= bound).all()
    assert not layer.merged
    torch.testing.assert_close(layer(x), y, **tol)


def test_merge_into_4bit_base_dequantizes():
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    dense = nn.Linear(64, 32, bias=False)
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q = q.to("cpu")  # quantizes
    if not hasattr(q.weight, "quant_state") or q.weight.quant_state is None:
        pytest.fail("bitsandbytes did not quantize the weight on the CPU")
    layer = LoRALinear(q, r=4, alpha=8)
    layer.B.data.normal_(std=0.1)
    x = torch.randn(3, 64)
    y = layer(x)
    plain = layer.merge()
    w = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    torch.testing.assert_close(plain.weight, w.float() + layer.delta_weight(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain(x), y, atol=1e-4, rtol=1e-4)  # base(x) dequantizes the same W
    with pytest.raises(ValueError, match="re-quantizing"):
        layer.merge_()
    layer.A.grad = None
    layer(x).sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None  # trains through the 4-bit base


def test_gradients_reach_only_A_and_B_in_a_model():
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    assert apply_lora(model, ["q_proj", "v_proj"], r=2, alpha=4) is model  # in place, returns the model
    n = count_trainable(model)
    # q: 32 -> 32, v: 32 -> 16 (2 kv heads of 8): per block r(32+32) + r(32+16), 2 blocks
    assert n == 2 * (2 * 64 + 2 * 48)
    assert sum(p.numel() for p in model.parameters()) == total + n
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None}
    assert grads == {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.endswith((".A", ".B")) for name in grads)


def test_apply_lora_matches_by_name_suffix():
    model = tiny_llama()
    apply_lora(model, "o_proj", r=1)
    assert sorted(lora_layers(model)) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


def test_apply_lora_wraps_lm_head_only_when_named_and_never_a_wrapped_base():
    model = apply_lora(tiny_llama(), ["lm_head", "self_attn.q_proj"], r=1)
    assert sorted(lora_layers(model)) == ["lm_head", "model.layers.0.self_attn.q_proj",
                                          "model.layers.1.self_attn.q_proj"]
    apply_lora(model, ["q_proj", "base", "k_proj"], r=1)  # q_proj is a LoRALinear now: its .base stays as is
    assert not any(isinstance(m.base, LoRALinear) for m in lora_layers(model).values())
    assert len(lora_layers(model)) == 5


def test_apply_lora_passes_the_flags_to_every_layer():
    model = apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.1, use_rslora=True,
                       use_dora=True)
    layers = lora_layers(model).values()
    assert len(layers) == 4 and all(m.use_dora and m.use_rslora and m.scaling == 4.0 for m in layers)
    assert all(isinstance(m.dropout, nn.Dropout) and m.dropout.p == 0.1 for m in layers)
    # trainable: A, B and DoRA's magnitude (one per output feature): q 32 -> 32, v 32 -> 16, two blocks
    assert count_trainable(model) == 2 * (4 * 64 + 32 + 4 * 48 + 16)


def test_dropout_is_applied_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4, dropout=0.5)
    layer.B.data.normal_()
    x = torch.randn(4, 16)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # two dropout masks
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive int"),
    (dict(r=2.0), "r must be a positive int"),
    (dict(alpha=0), "alpha must be a finite number > 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
    (dict(dropout=1.0), r"dropout must be a float in \[0, 1\)"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(4, 4), **kwargs)


def test_base_must_be_linear():
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1))


def test_merge_unmerge_state_errors():
    layer = LoRALinear(nn.Linear(4, 4), r=1)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge_()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge_()


def test_merge_rejects_nan():
    layer = LoRALinear(nn.Linear(4, 4), r=1)
    layer.B.data.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()


def test_apply_lora_errors():
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_lora(tiny_llama(), ["c_attn"])
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        apply_lora(tiny_llama(), [])
    with pytest.raises(ValueError, match="holds no LoRALinear"):
        merge_lora(tiny_llama())
