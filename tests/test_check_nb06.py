"""The notebook 06 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted; the checkers' expected values agree with torch, qlearn.lora and PEFT's shapes."""

import pytest
import torch

from qlearn.check import nb06
from qlearn.lora import apply_lora
from qlearn.modules import count_trainable


def survives(w, update):
    return (w.float() + update).to(torch.bfloat16) != w


def survives_in_fp32(w, update):  # the usual mistake: never rounds the sum back to bf16
    return (w.float() + update) != w.float()


def lora_forward(x, W, b, A, B, alpha, r):
    out = x @ W.T + (alpha / r) * (x @ A.T @ B.T)
    return out if b is None else out + b


def lora_forward_no_scaling(x, W, b, A, B, alpha, r):
    out = x @ W.T + x @ A.T @ B.T
    return out if b is None else out + b


def lora_param_count(config, r, target_modules):
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv, m = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim, config.intermediate_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
    return layers * sum(r * sum(shapes[t]) for t in target_modules)


def lora_param_count_no_gqa(config, r, target_modules):  # the usual mistake: k, v as wide as q
    h, m = config.hidden_size, config.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
    return config.num_hidden_layers * sum(r * sum(shapes[t]) for t in target_modules)


def merge(W, A, B, alpha, r):
    return W + (alpha / r) * (B @ A)


def merge_in_place(W, A, B, alpha, r):
    W += (alpha / r) * (B @ A)
    return W


def merge_without_scaling(W, A, B, alpha, r):
    return W + B @ A


def stub(*args):
    raise NotImplementedError("Exercise 5.x: your code here")


def test_survive_cases_are_torchs_rounding():
    for w, u, expected in nb06._SURVIVE_CASES:
        bw = torch.tensor(w, dtype=torch.bfloat16)
        assert bool((bw.float() + torch.tensor(u)).to(torch.bfloat16) != bw) == expected, (w, u)


def test_count_cases_match_apply_lora_on_the_same_shapes():
    from transformers import LlamaForCausalLM

    for kwargs, r, targets, expected, _ in nb06._COUNT_CASES:
        with torch.device("meta"):  # shapes only: an 8B model costs no memory on the meta device
            model = LlamaForCausalLM(nb06._config(**kwargs))
        assert count_trainable(apply_lora(model, targets, r=r, alpha=2 * r)) == expected


@pytest.mark.parametrize("checker, good, bad, hint", [
    (nb06.bf16_update_survives, survives, survives_in_fp32, "round the sum to bf16"),
    (nb06.lora_forward, lora_forward, lora_forward_no_scaling, "alpha / r"),
    (nb06.lora_param_count, lora_param_count, lora_param_count_no_gqa, "num_key_value_heads * head_dim"),
    (nb06.merge_lora_weight, merge, merge_without_scaling, "alpha / r"),
])
def test_checker_passes_fails_with_hint_and_reports_a_stub(checker, good, bad, hint, capsys):
    assert checker(good).passed
    result = checker(bad)
    assert result.status == "FAILED" and hint in result.message
    assert checker(stub).status == "NOT ATTEMPTED"
    out = capsys.readouterr().out
    assert out.count("[qlearn.check]") == 3


def test_merge_checker_catches_in_place_merging():
    result = nb06.merge_lora_weight(merge_in_place)
    assert result.status == "FAILED" and "changed W in place" in result.message
