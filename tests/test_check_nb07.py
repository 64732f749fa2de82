"""The notebook 07 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted; the reference answers agree with bitsandbytes and PEFT."""

import logging

import pytest
import torch

from qlearn.check import nb07

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU backend notes about optional kernels
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def double_quant_bits(code_bits, blocksize, absmax_bits, blocksize2, absmax2_bits):
    return code_bits + absmax_bits / blocksize + absmax2_bits / (blocksize * blocksize2)


def double_quant_bits_per_block2(code_bits, blocksize, absmax_bits, blocksize2, absmax2_bits):
    return code_bits + absmax_bits / blocksize + absmax2_bits / blocksize2  # the usual mistake


def double_quant_bits_no_dq(code_bits, blocksize, absmax_bits, blocksize2, absmax2_bits):
    return code_bits + 32 / blocksize


def dequantize_block(packed, absmax, table):
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return table[codes.long()] * absmax


def dequantize_block_low_first(packed, absmax, table):
    codes = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    return table[codes.long()] * absmax


def dequantize_block_unscaled(packed, absmax, table):
    return dequantize_block(packed, torch.tensor(1.0), table)


def lora_params(config, r, target_modules):
    h, m = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
    return config.num_hidden_layers * sum(r * (i + o) for i, o in (shapes[t] for t in target_modules))


def lora_params_ignores_gqa(config, r, target_modules):
    h, m = config.hidden_size, config.intermediate_size
    shapes = {"q_proj": 2 * h, "k_proj": 2 * h, "v_proj": 2 * h, "o_proj": 2 * h,
              "gate_proj": h + m, "up_proj": h + m, "down_proj": m + h}
    return config.num_hidden_layers * sum(r * shapes[t] for t in target_modules)


def lora_params_one_layer(config, r, target_modules):
    return lora_params(config, r, target_modules) // config.num_hidden_layers


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise 6.k: your code here")


@pytest.mark.parametrize(("checker", "solution"), [
    (nb07.double_quant_bits, double_quant_bits),
    (nb07.dequantize_block, dequantize_block),
    (nb07.lora_params, lora_params),
])
def test_correct_solution_passes(checker, solution, capsys):
    result = checker(solution)
    assert result.passed, result.message
    assert capsys.readouterr().out.startswith("[qlearn.check] PASSED 7.")


@pytest.mark.parametrize(("checker", "wrong", "hint"), [
    (nb07.double_quant_bits, double_quant_bits_per_block2, "blocksize * blocksize2 weights"),
    (nb07.double_quant_bits, double_quant_bits_no_dq, "absmax2_bits / (blocksize * blocksize2)"),
    (nb07.dequantize_block, dequantize_block_low_first, "HIGH nibble"),
    (nb07.dequantize_block, dequantize_block_unscaled, "multiply table[codes] by absmax"),
    (nb07.lora_params, lora_params_ignores_gqa, "num_key_value_heads * head_dim"),
    (nb07.lora_params, lora_params_one_layer, "multiply by num_hidden_layers"),
])
def test_typical_mistake_fails_with_its_hint(checker, wrong, hint, capsys):
    result = checker(wrong)
    assert result.status == "FAILED" and hint in result.message, result.message
    assert capsys.readouterr().out.startswith("[qlearn.check] FAILED 7.")


@pytest.mark.parametrize("checker", [nb07.double_quant_bits, nb07.dequantize_block, nb07.lora_params])
def test_stub_is_not_attempted(checker, capsys):
    assert checker(stub).status == "NOT ATTEMPTED"
    assert "NOT ATTEMPTED" in capsys.readouterr().out


def test_double_quant_answer_is_qlearn_memory_bits_per_param():
    from qlearn.memory import bits_per_param

    assert double_quant_bits(4, 64, 8, 256, 32) == bits_per_param("nf4", 64, double_quant=True)
    assert double_quant_bits(4, 64, 32, 1, 0) == bits_per_param("nf4", 64) == 4.5


def test_dequantize_block_answer_is_bitsandbytes():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from qlearn.quant.nf4 import codebook

    w = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.03
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    got = dequantize_block(packed.reshape(-1), state.absmax[0], codebook())
    assert torch.equal(got, bnbF.dequantize_4bit(packed, state).reshape(-1))


def test_lora_params_answer_is_peft_count():
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    for r, targets in [(8, TARGETS), (4, ["q_proj", "v_proj"])]:
        model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=r, lora_alpha=2 * r,
                                                                              target_modules=targets))
        trainable, _ = model.get_nb_trainable_parameters()
        assert lora_params(config, r, targets) == trainable
