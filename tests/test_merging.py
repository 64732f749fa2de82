"""qlearn.merging: re-quantization after a merge (against peft's 4-bit merge), LoRA merged into 4 bits on a
model, combining adapters (against peft's add_weighted_adapter), several adapters in one batch (peft's
mixed-batch inference against one run per adapter), errors."""

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

from qlearn.lora import apply_lora, lora_layers
from qlearn.merging import (
    combine_adapters,
    merge_lora_requantized,
    mixed_batch_answers,
    mixed_batch_logits,
    requantization_report,
    requantize,
)
from qlearn.paths import data_dir
from qlearn.quant import nf4, quantize

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU backend notes about optional kernels
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


class TwoLayers(nn.Module):
    def __init__(self, d_in=128, d_hidden=192, d_out=64):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _randomize_B(model, scale=0.05, seed=1):
    """B = 0 makes every merge test pass trivially (PEFT's tests warn of this): give B values first."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * scale


def _four_bit(module: TwoLayers, quant_type="nf4", compress_statistics=False) -> TwoLayers:
    """The same module with bitsandbytes Linear4bit layers (quantized on the CPU)."""
    out = copy.deepcopy(module)
    for name in ("up", "down"):
        lin = getattr(module, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=compress_statistics, quant_type=quant_type)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=compress_statistics, blocksize=64)
        setattr(out, name, q.to("cpu"))  # .to quantizes
    out.is_loaded_in_4bit = True  # what transformers sets; peft then wraps Linear4bit with its bnb LoRA layer
    return out


def _unpacked_codes(weight) -> torch.Tensor:
    flat = weight.data.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)  # first code in the high nibble


def test_requantize_keeps_the_stored_codes_for_a_zero_update():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    stored = nf4.quantize_nf4(w)
    codes, w_hat = stored.codes, stored.dequantize()
    r = requantize(w_hat, torch.zeros_like(w_hat))
    assert torch.equal(r.codes_before, codes)  # re-quantizing the dequantized weight gives its codes back
    assert torch.equal(r.codes_after, codes) and r.unchanged == 1.0 and r.max_change == 0.0
    assert torch.equal(r.w_before, w_hat)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_requantize_rounds_a_small_update_away_and_keeps_a_large_one(quant_type):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w_hat = getattr(nf4, f"quantize_{quant_type}")(w).dequantize()
    direction = torch.randn_like(w)
    small = requantize(w_hat, 1e-5 * direction, quant_type=quant_type)  # << one code step (~1e-3 here)
    large = requantize(w_hat, 1e-1 * direction, quant_type=quant_type)  # >> one code step
    assert small.unchanged > 0.99 and small.relative_error > 0.9  # the update is (nearly) all lost
    assert large.unchanged < 0.2 and large.relative_error < 0.2  # what survives is the update, to a step
    assert 0 <= small.max_change <= large.max_change


def test_requantization_report_matches_peft_merge_into_4bit():
    torch.manual_seed(0)
    fp = TwoLayers()
    model = peft.get_peft_model(_four_bit(fp), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    _randomize_B(model, scale=0.02)
    report = requantization_report(model)
    stored = {n: _unpacked_codes(m.get_base_layer().weight) for n, m in model.named_modules() if hasattr(m, "lora_A")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload()
    assert any("Merge lora module to 4-bit linear" in str(w.message) for w in caught)  # peft's warning
    unchanged = total = 0
    for name, codes_before in stored.items():
        layer = merged.get_submodule(name.removeprefix("base_model.model."))
        codes_after = _unpacked_codes(layer.weight)
        unchanged += int((codes_after == codes_before).sum())
        total += codes_before.numel()
    assert report.params == total == 128 * 192 + 192 * 64
    assert report.unchanged_params == unchanged  # peft re-quantizes exactly as requantize does (no DQ)
    assert 0.0 < report.unchanged < 1.0 and set(report.layers) == set(stored)
    assert report.max_change > 0 and report.max_delta > 0


def test_requantization_report_needs_a_4bit_base():
    model = peft.get_peft_model(TwoLayers(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up"]))
    with pytest.raises(ValueError, match="has no 4-bit base"):
        requantization_report(model)
    with pytest.raises(ValueError, match="no LoRA layer with an adapter named 'other'"):
        requantization_report(model, "other")


@pytest.mark.parametrize("combination_type", ["cat", "linear"])
@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, -0.4]])
def test_combine_adapters_matches_peft_add_weighted_adapter(combination_type, weights):
    torch.manual_seed(0)
    model = peft.get_peft_model(TwoLayers(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]),
                                adapter_name="one")
    model.add_adapter("two", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["up", "down"]))
    _randomize_B(model)
    model.add_weighted_adapter(["one", "two"], weights, "mix", combination_type=combination_type)
    layer = model.base_model.model.up
    names = ["one", "two"]
    As = [layer.lora_A[n].weight.data for n in names]
    Bs = [layer.lora_B[n].weight.data for n in names]
    A, B = combine_adapters(As, Bs, [layer.scaling[n] for n in names], weights, combination_type)
    rank = 8 if combination_type == "cat" else 4
    assert A.shape == (rank, 128) and B.shape == (192, rank)
    # float32, same operations in the same order as peft: equal to rounding of a few additions
    torch.testing.assert_close(A, layer.lora_A["mix"].weight.data, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(B, layer.lora_B["mix"].weight.data, rtol=1e-6, atol=1e-7)
    assert layer.scaling["mix"] == 1.0


def test_cat_is_the_exact_weighted_sum_and_linear_adds_cross_terms():
    torch.manual_seed(0)
    As = [torch.randn(4, 32), torch.randn(4, 32)]
    Bs = [torch.randn(16, 4), torch.randn(16, 4)]
    s, w = [2.0, 0.5], [0.6, 0.4]
    exact = sum(wi * si * B @ A for A, B, si, wi in zip(As, Bs, s, w))
    A, B = combine_adapters(As, Bs, s, w, "cat")
    torch.testing.assert_close(B @ A, exact, rtol=1e-5, atol=1e-5)  # float32 sums in another order
    A, B = combine_adapters(As, Bs, s, w, "linear")
    c = (w[0] * s[0] * w[1] * s[1]) ** 0.5
    torch.testing.assert_close(B @ A, exact + c * (Bs[0] @ As[1] + Bs[1] @ As[0]), rtol=1e-5, atol=1e-5)


def test_errors_name_the_parameter():
    w = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        requantize(w, w, quant_type="int4")
    with pytest.raises(ValueError, match="delta must have w_hat's shape"):
        requantize(w, torch.zeros(4, 32))
    with pytest.raises(ValueError, match="delta contains NaN or inf"):
        requantize(w, torch.full_like(w, float("nan")))
    with pytest.raises(TypeError, match="must be torch.Tensors"):
        requantize(w.tolist(), w)
    with pytest.raises(ValueError, match="the update dW is zero"):
        _ = requantize(torch.randn(4, 64), w).relative_error
    A, B = torch.zeros(4, 8), torch.zeros(6, 4)
    with pytest.raises(ValueError, match="combination_type must be one of"):
        combine_adapters([A], [B], [1.0], [1.0], "svd")
    with pytest.raises(ValueError, match="equal length"):
        combine_adapters([A, A], [B], [1.0], [1.0])
    with pytest.raises(ValueError, match=r"A must be \(r, in\) and B \(out, r\)"):
        combine_adapters([A], [B.T], [1.0], [1.0])
    with pytest.raises(ValueError, match="must target the same layer"):
        combine_adapters([A, torch.zeros(4, 9)], [B, B], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="needs adapters of equal rank"):
        combine_adapters([A, torch.zeros(2, 8)], [B, torch.zeros(6, 2)], [1.0, 1.0], [1.0, 1.0], "linear")


def _tiny_llama(vocab=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["rtn", "nf4"])
def test_merge_lora_requantized_requantizes_the_merged_weight(method):
    model = apply_lora(_tiny_llama(), ["q_proj", "down_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    for layer in lora_layers(model).values():  # B = 0 would make the test pass trivially
        layer.B.data = torch.randn(layer.B.shape, generator=g) * 0.05
    merged = {name: layer.merged_weight() for name, layer in lora_layers(model).items()}
    assert merge_lora_requantized(model, method, 4, 32) is model and not lora_layers(model)
    for name, w in merged.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear
        expected = (quantize(w, 4, symmetric=False, group_size=32) if method == "rtn"
                    else nf4.quantize_nf4(w, 32)).dequantize()
        assert torch.equal(layer.weight, expected)  # quantize(W + s B A), the same function on the same input


def test_merge_lora_requantized_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        merge_lora_requantized(_tiny_llama(), "gptq")
    with pytest.raises(ValueError, match="nf4 is a 4-bit code book: bits must be 4"):
        merge_lora_requantized(_tiny_llama(), "nf4", bits=3)
    with pytest.raises(ValueError, match="holds no LoRALinear"):
        merge_lora_requantized(_tiny_llama())


@pytest.fixture(scope="module")
def two_tasks():
    """A PEFT model with two adapters, "one" and "two", with random B (so they differ from each other and from
    the base), the course's tokenizer and prompts of the two tasks."""
    from transformers import AutoTokenizer

    from qlearn import tasks

    tok = AutoTokenizer.from_pretrained(data_dir() / "tiny")
    tok.pad_token = tok.pad_token or tok.eos_token
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    model = peft.get_peft_model(_tiny_llama(len(tok)), peft.LoraConfig(**cfg), adapter_name="one")
    model.add_adapter("two", peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    prompts = [ex["prompt"] for name in tasks.TASKS for ex in tasks.load(name).test[:3]]
    return model.eval(), tok, prompts


def test_mixed_batch_logits_equal_one_run_per_adapter(two_tasks):
    model, tok, prompts = two_tasks
    batch = tok(prompts, return_tensors="pt", padding=True)
    names = ["one", "two", "__base__", "two", "one", "one"]
    mixed = mixed_batch_logits(model, batch, names)
    separate = mixed_batch_logits(model, batch, names, separately=True)
    assert model.active_adapter == "one"  # restored after the separate runs
    # the same products on sub-batches of other sizes: float32 sums that may be blocked differently
    torch.testing.assert_close(mixed, separate, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        assert torch.allclose(mixed[2], model(**batch).logits[2], atol=1e-5)  # "__base__": the base alone
    # the adapters are different: a row served by the wrong adapter would show it
    assert (mixed[0] - mixed_batch_logits(model, batch, ["two"] * 6)[0]).abs().max() > 0.1


def test_two_tasks_answered_in_one_batch_as_in_separate_runs(two_tasks):
    model, tok, prompts = two_tasks
    names = ["one"] * 3 + ["two"] * 3  # the first task's prompts to adapter one, the second's to two
    together = mixed_batch_answers(model, tok, prompts, names, max_new_tokens=8)
    apart = mixed_batch_answers(model, tok, prompts, names, separately=True, max_new_tokens=8)
    assert together == apart and len(together) == 6
    assert together != mixed_batch_answers(model, tok, prompts, ["one"] * 6, max_new_tokens=8)


def test_mixed_batch_errors(two_tasks):
    model, tok, prompts = two_tasks
    batch = tok(prompts[:2], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="adapter_names must be a list of 2 adapter names"):
        mixed_batch_logits(model, batch, ["one"])
    with pytest.raises(ValueError, match=r"adapter_names holds \['three'\], not adapters of the model"):
        mixed_batch_answers(model, tok, prompts[:2], ["one", "three"])
