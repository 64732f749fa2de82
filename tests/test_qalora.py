"""qlearn.qalora: the QA-LoRA forward (against its formula and PEFT's use_qalora forward), the lossless merge
into the zero points (same codes; what float32, fp16 and integer zero points keep), apply_qalora with RTN
and GPTQ, merge_qalora on a model, errors."""

import types

import pytest
import torch
from torch import nn

from qlearn.modules import count_trainable
from qlearn.qalora import QALoRALinear, QuantizedLinear, apply_qalora, merge_qalora, qalora_layers
from qlearn.quant import gptq, quantize


def layer_with_update(seed=0, out=48, d_in=256, bits=4, group_size=64, bias=True, std=0.5):
    """A QALoRALinear on a fresh RTN weight, with random B (B = 0 makes every merge test pass trivially)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, d_in, generator=g) * 0.05
    qweight = quantize(w, bits, symmetric=False, group_size=group_size)
    torch.manual_seed(seed)
    layer = QALoRALinear(qweight, r=4, alpha=8, bias=torch.randn(out, generator=g) if bias else None)
    with torch.no_grad():
        layer.B.copy_(torch.randn(out, 4, generator=g) * std)
    return layer, qweight


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def test_starts_as_the_quantized_layer_and_a_is_l_times_smaller():
    layer, qweight = layer_with_update()
    with torch.no_grad():
        layer.B.zero_()
    x = torch.randn(3, 5, 256)
    w_hat = qweight.dequantize()
    assert torch.equal(layer(x), nn.functional.linear(x, w_hat, layer.base.bias))  # B = 0: exactly the base
    assert layer.A.shape == (4, 256 // 64) and layer.B.shape == (48, 4)
    assert count_trainable(layer) == 4 * (256 // 64 + 48)  # LoRA's would be 4 * (256 + 48)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["A", "B"]


def test_forward_is_the_formula_and_its_update_is_constant_within_each_group():
    layer, qweight = layer_with_update()
    x = torch.randn(7, 256)
    pooled = x.reshape(7, 4, 64).mean(dim=-1)  # pool_L: (7, 256) -> (7, 4 groups)
    expected = x @ qweight.dequantize().T + layer.base.bias + 2.0 * (pooled @ layer.A.T @ layer.B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)  # the same ops, float32 sums
    delta = layer.delta_weight()  # (out, in)
    assert torch.equal(delta, delta[:, ::64].repeat_interleave(64, dim=1))  # one value per group
    torch.testing.assert_close(x @ delta.T, layer(x) - layer.base(x), atol=1e-6, rtol=1e-5)  # sums reordered


def test_forward_equals_pefts_use_qalora_forward_up_to_its_factor_of_g():
    """PEFT's QALoraLinearVariant (GPTQ layers only) pools with the mean times G = in / L; called on its own
    (a stand-in for the PEFT layer holding what the variant reads), its update equals ours if A = G A_peft."""
    from peft.tuners.lora.variants import QALoraLinearVariant

    layer, _ = layer_with_update()
    n_groups = layer.n_groups
    lora_A, lora_B = nn.Linear(n_groups, 4, bias=False), nn.Linear(4, 48, bias=False)
    with torch.no_grad():
        lora_A.weight.copy_(layer.A / n_groups)
        lora_B.weight.copy_(layer.B)
    module = types.SimpleNamespace(lora_A={"default": lora_A}, lora_B={"default": lora_B}, training=False,
                                   lora_dropout={"default": nn.Identity()}, in_features=256,
                                   scaling={"default": layer.scaling}, qalora_group_size={"default": 64})
    x = torch.randn(2, 5, 256)
    base = layer.base(x)
    theirs = QALoraLinearVariant.forward(module, active_adapter="default", x=x, result=base)
    # the same pooled product, with the factor G moved from the input to A: float32 rounding of both
    torch.testing.assert_close(layer(x), theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed, bits, group_size",
                         [(0, 4, 64), (1, 4, 32), (2, 2, 64), (3, 3, 128), (4, 8, 16)])
def test_merge_keeps_every_code_and_gives_the_unmerged_outputs(seed, bits, group_size):
    layer, qweight = layer_with_update(seed, bits=bits, group_size=group_size)
    x = torch.randn(16, 256)
    y = layer(x)
    merged = layer.merge()
    assert merged.q.dtype == qweight.q.dtype and torch.equal(merged.q, qweight.q)  # every code kept
    assert torch.equal(merged.scale, qweight.scale) and merged.group_size == group_size
    assert not torch.equal(merged.zero_point, qweight.zero_point)  # only the zero points moved
    # the merged weight is W_hat + D up to four float32 roundings (D / scale, z - ., q - z', times scale),
    # each at most 2^-24 of the numbers involved: |error| <= 2^-22 scale (|q| + |z'| + |D| / scale)
    exact = qweight.dequantize().double() + layer.delta_weight().double()
    per_weight = lambda t: t.expand(48, 256 // group_size, group_size).reshape(48, 256).double()  # noqa: E731
    scale, z_new = per_weight(qweight.scale), per_weight(merged.zero_point)
    shift = layer.delta_weight().double().abs() / scale
    bound = 2.0**-22 * scale * (qweight.q.double() + z_new.abs() + shift)
    assert ((merged.dequantize().double() - exact).abs() <= bound).all()
    out = QuantizedLinear(merged, layer.base.bias)(x)
    # outputs: those weight roundings summed over 256 inputs, against |y| ~ 1: a few float32 ulps of the sum
    torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-5)


def test_zero_point_precision_float32_exact_fp16_close_integers_lose_small_updates():
    layer, qweight = layer_with_update(std=0.5)
    x = torch.randn(32, 256)
    y = layer(x)
    err = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int32):
        merged = layer.merge(dtype)
        assert torch.equal(merged.q, qweight.q)
        err[dtype] = (QuantizedLinear(merged, layer.base.bias)(x) - y).abs().max().item()
    assert err[torch.float32] < 1e-5 < err[torch.float16] < err[torch.bfloat16] < err[torch.int32], err
    # storage: float32 zero points cost 16 more bits per group than fp16 ones; GPTQ packs integers in 4 bits
    assert layer.merge(torch.float32).bits_per_param() == 4 + (16 + 32) / 64
    assert layer.merge(torch.float16).bits_per_param() == qweight.bits_per_param() == 4 + 32 / 64
    assert layer.merge(torch.int32).bits_per_param() == 4 + (16 + 4) / 64
    z_int = layer.merge(torch.int32).zero_point
    assert torch.equal(z_int, z_int.round()) and 0 <= z_int.min() and z_int.max() <= 15  # packable in 4 bits
    # an update of less than half a grid step in every group is rounded away entirely by integer zero points
    with torch.no_grad():
        layer.B.mul_(0.4 * (qweight.scale.min() / layer.group_shift().abs().max()))  # |D| < 0.4 scale
    merged = layer.merge(torch.int32)
    assert torch.equal(merged.zero_point, qweight.zero_point)
    assert torch.equal(merged.dequantize(), qweight.dequantize())
    assert layer.delta_weight().abs().max() > 0  # while the float merge keeps it:
    assert not torch.equal(layer.merge().dequantize(), qweight.dequantize())


def test_quantized_linear_dequantizes_again_after_a_buffer_changes():
    layer, qweight = layer_with_update()
    x = torch.randn(3, 256)
    with torch.inference_mode():
        layer.base(x)  # not cached: an inference tensor could not be saved for the backward below
    y = layer.base(x)
    assert torch.equal(layer.base(x), y)  # cached W_hat
    with torch.no_grad():
        layer.base.zero_point.add_(1.0)  # in place: the cache must notice
    torch.testing.assert_close(layer.base(x), y - x @ qweight.scale.expand(48, 4, 64).reshape(48, 256).T,
                               atol=1e-5, rtol=1e-5)  # W_hat - scale: float32 sums of 256 products
    layer(x.requires_grad_()).sum().backward()
    assert x.grad is not None


def test_gradients_reach_a_and_b():
    layer, _ = layer_with_update()
    layer(torch.randn(4, 256)).square().sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None and layer.A.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in layer.named_parameters() if n not in ("A", "B"))


def test_apply_qalora_quantizes_every_linear_but_lm_head_and_merges_losslessly():
    model = tiny_llama()
    ref_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert apply_qalora(model, r=2, alpha=4, bits=4, group_size=32) is model
    layers = qalora_layers(model)
    assert len(layers) == 14 and isinstance(model.lm_head, nn.Linear)
    for name, layer in layers.items():  # RTN codes of the original weight
        assert torch.equal(layer.base.q, quantize(ref_weights[name], 4, symmetric=False, group_size=32).q)
    # q 64 -> 64, k/v 64 -> 32, o 64 -> 64, gate/up 64 -> 128, down 128 -> 64; A has in / 32 columns
    per_block = sum(2 * (d_in // 32 + d_out) for d_in, d_out in
                    [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert count_trainable(model) == 2 * per_block
    g = torch.Generator().manual_seed(1)
    for layer in layers.values():
        with torch.no_grad():
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.3)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    with torch.no_grad():
        logits = model(ids).logits
        codes = {n: layer.base.q.clone() for n, layer in layers.items()}
        merge_qalora(model)
        merged_logits = model(ids).logits
    assert not qalora_layers(model)
    assert all(torch.equal(model.get_submodule(n).q, c) for n, c in codes.items())  # every code kept
    # float32 zero points: the weights agree to float rounding; logits through 2 blocks, to ~1e-6 relative
    torch.testing.assert_close(merged_logits, logits, atol=1e-4, rtol=1e-4)


def test_apply_qalora_with_gptq_groups():
    model = tiny_llama()
    calib = [torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    inputs = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        for ids in calib:
            model(ids[None])
    hook.remove()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    apply_qalora(model, r=2, alpha=4, group_size=32, method="gptq", calib=calib)
    expected = gptq.gptq_quantize(w, gptq.hessian(torch.cat(inputs).reshape(-1, 64)), 4, 32)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.base.q, expected.q) and torch.equal(layer.base.zero_point, expected.zero_point)
    assert not torch.equal(layer.base.q, quantize(w, 4, symmetric=False, group_size=32).q)  # not RTN's


def test_errors_name_the_parameter():
    w = torch.randn(8, 64)
    group = quantize(w, 4, symmetric=False, group_size=32)
    with pytest.raises(TypeError, match="qweight must be a qlearn.quant.QTensor"):
        QALoRALinear(w)
    with pytest.raises(ValueError, match="QA-LoRA needs a group-quantized"):
        QALoRALinear(quantize(w, 4, symmetric=False, axis=0))  # per channel
    with pytest.raises(ValueError, match="qweight must be asymmetric"):
        QALoRALinear(quantize(w, 4, symmetric=True, group_size=32))
    with pytest.raises(ValueError, match="r must be a positive int"):
        QALoRALinear(group, r=0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        QALoRALinear(group, alpha=-1)
    with pytest.raises(ValueError, match="zero_point_dtype must be"):
        QALoRALinear(group).merge(torch.float64)
    with pytest.raises(ValueError, match="group_size must be a positive int dividing in_features; "
                       "model.layers.0.self_attn.q_proj has in_features=64, got group_size=48"):
        apply_qalora(tiny_llama(), group_size=48)
    with pytest.raises(ValueError, match="method must be one of"):
        apply_qalora(tiny_llama(), method="awq")
    with pytest.raises(ValueError, match="calib must be a non-empty list of token-id tensors"):
        apply_qalora(tiny_llama(), group_size=32, method="gptq")
    with pytest.raises(ValueError, match="r must be a positive int"):
        apply_qalora(tiny_llama(), r=0)
    with pytest.raises(ValueError, match="holds no QALoRALinear"):
        merge_qalora(tiny_llama())
