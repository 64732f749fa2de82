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


def loftq_step(w, low_rank, r, quant):
    q = quant(w - low_rank)
    U, S, Vh = torch.linalg.svd(w - q, full_matrices=False)
    return q, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def loftq_step_quantizes_w(w, low_rank, r, quant):
    q = quant(w)  # the mistake: the same Q at every step
    U, S, Vh = torch.linalg.svd(w - q, full_matrices=False)
    return q, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def loftq_step_svd_of_w(w, low_rank, r, quant):
    q = quant(w - low_rank)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # the mistake: PiSSA's factors, not the error's
    return q, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def loftq_step_full_rank(w, low_rank, r, quant):
    q = quant(w - low_rank)
    return q, w - q  # the mistake: no rank-r truncation


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise 6.k: your code here")


@pytest.mark.parametrize(("checker", "solution"), [
    (nb07.double_quant_bits, double_quant_bits),
    (nb07.dequantize_block, dequantize_block),
    (nb07.lora_params, lora_params),
    (nb07.loftq_step, loftq_step),
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
    (nb07.loftq_step, loftq_step_quantizes_w, "Q = quant(W - low_rank)"),
    (nb07.loftq_step, loftq_step_svd_of_w, "SVD of W - Q, not of W"),
    (nb07.loftq_step, loftq_step_full_rank, "keep only the top r singular triplets"),
])
def test_typical_mistake_fails_with_its_hint(checker, wrong, hint, capsys):
    result = checker(wrong)
    assert result.status == "FAILED" and hint in result.message, result.message
    assert capsys.readouterr().out.startswith("[qlearn.check] FAILED 7.")


@pytest.mark.parametrize("checker", [nb07.double_quant_bits, nb07.dequantize_block, nb07.lora_params,
                                     nb07.loftq_step])
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


def test_loftq_step_answer_is_qlearn_loftq_init():
    """One alternation of the answer gives qlearn.lora.loftq_init's Q and s B A (2 bits: RTN groups of 64).
    (Not compared over two: the first step's low_rank differs from loftq_init's s (B A) in float32 rounding,
    and at 2 bits that can move a whole group's zero point in the second step.)"""
    from qlearn.lora import loftq_init
    from qlearn.quant import quantize

    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    quant = lambda m: quantize(m, 2, symmetric=False, group_size=64).dequantize(torch.float32)  # noqa: E731
    q, low_rank = loftq_step(w, torch.zeros_like(w), 4, quant)
    q_ref, A, B, errors = loftq_init(w, 4, scaling=2.0, bits=2, iters=1)
    assert torch.equal(q, q_ref)
    # 1e-6: U S V^T against 2 (U sqrt(S/2)) (sqrt(S/2) V^T), float32 rounding on entries ~0.01
    assert torch.allclose(low_rank, 2.0 * B @ A, atol=1e-6)
    assert abs((w - q - low_rank).norm().item() - errors[0]) < 1e-6
