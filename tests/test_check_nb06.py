"""The notebook 06 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted; the checkers' expected values agree with torch, qlearn.lora and PEFT's shapes."""

import math

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
    raise NotImplementedError("Exercise 6.x: your code here")


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


def scaling(alpha, r, use_rslora):
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def scaling_always_over_r(alpha, r, use_rslora):  # the usual mistake: rsLoRA's flag ignored
    return alpha / r


def scaling_sqrt_of_ratio(alpha, r, use_rslora):
    return math.sqrt(alpha / r) if use_rslora else alpha / r


def dora(W, A, B, m, scaling):
    adapted = W + scaling * (B @ A)
    return m.view(-1, 1) * adapted / adapted.norm(dim=1, keepdim=True)


def dora_column_norms(W, A, B, m, scaling):  # the usual mistake: the norm over the wrong dimension
    adapted = W + scaling * (B @ A)
    return m.view(-1, 1) * adapted / adapted.norm(dim=0, keepdim=True)


def dora_norm_of_w(W, A, B, m, scaling):
    return m.view(-1, 1) * (W + scaling * (B @ A)) / W.norm(dim=1, keepdim=True)


def pissa(W, r, scaling):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = torch.sqrt(S[:r] / scaling)
    B, A = U[:, :r] * root, root[:, None] * Vh[:r]
    return A, B, W - scaling * B @ A


def pissa_smallest(W, r, scaling):  # the usual mistake: the last r triplets
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = torch.sqrt(S[-r:] / scaling)
    B, A = U[:, -r:] * root, root[:, None] * Vh[-r:]
    return A, B, W - scaling * B @ A


def pissa_unscaled(W, r, scaling):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    B, A = U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]
    return A, B, W - scaling * B @ A


def pissa_no_residual(W, r, scaling):
    A, B, _ = pissa(W, r, scaling)
    return A, B, W


@pytest.mark.parametrize("checker, good, bad, hint", [
    (nb06.lora_scaling, scaling, scaling_always_over_r, "not by r"),
    (nb06.lora_scaling, scaling, scaling_sqrt_of_ratio, "of r alone"),
    (nb06.dora_weight, dora, dora_column_norms, "rows of the (out, in) weight"),
    (nb06.dora_weight, dora, dora_norm_of_w, "ADAPTED weight"),
    (nb06.pissa_init, pissa, pissa_smallest, "descending order"),
    (nb06.pissa_init, pissa, pissa_unscaled, "split S_r / scaling"),
    (nb06.pissa_init, pissa, pissa_no_residual, "W_res + scaling * B @ A = W"),
])
def test_new_checkers_pass_fail_with_hint_and_report_a_stub(checker, good, bad, hint, capsys):
    test_checker_passes_fails_with_hint_and_reports_a_stub(checker, good, bad, hint, capsys)


def test_scaling_cases_are_qlearns_and_pefts():
    from peft import LoraConfig, get_peft_model

    from qlearn.lora import LoRALinear

    for alpha, r, rs in nb06._SCALING_CASES:
        ours = LoRALinear(torch.nn.Linear(64, 64), r, alpha, use_rslora=rs).scaling
        peft_layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64)),
                                    LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_rslora=rs))
        assert ours == peft_layer.base_model.model[0].scaling["default"] == scaling(alpha, r, rs)


def test_dora_case_is_qlearns_merged_weight():
    from qlearn.lora import LoRALinear

    W, A, B, m, s = nb06._dora_case()
    base = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(W)
        layer = LoRALinear(base, r=1, alpha=s, use_dora=True)  # scaling alpha / r = s
        layer.A.copy_(A)
        layer.B.copy_(B)
        layer.magnitude.copy_(m)
    assert torch.equal(layer.merged_weight(), nb06._dora(W, A, B, m, s))
    assert not torch.allclose(W.norm(dim=0), W.norm(dim=1)[:1].expand(3))  # rows and columns differ: catchable


def test_pissa_case_is_qlearns_pissa_init():
    from qlearn.lora import pissa_init

    W, r, s = nb06._pissa_case()
    A, B, W_res = pissa_init(W, r, s)
    good_A, good_B, good_res = pissa(W, r, s)
    assert torch.allclose(B @ A, good_B @ good_A, atol=1e-6) and torch.allclose(W_res, good_res, atol=1e-6)
    S = torch.linalg.svdvals(W)
    assert (S[:-1] - S[1:]).min() > 0.1  # distinct singular values: the top r are well defined
