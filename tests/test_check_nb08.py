"""The notebook 08 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted; the reference answers agree with torch's bf16 rounding, qlearn.merging and PEFT."""

import logging

import pytest
import torch

from qlearn.check import nb08
from qlearn.quant import nf4

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU backend notes about optional kernels


def bf16_half_spacing(x):
    return torch.exp2(torch.floor(torch.log2(x.abs())) - 8)


def bf16_full_spacing(x):
    return torch.exp2(torch.floor(torch.log2(x.abs())) - 7)  # the usual mistake: the whole gap


def fp16_half_spacing(x):
    return torch.exp2(torch.floor(torch.log2(x.abs())) - 11)  # float16's 10 mantissa bits


def codes_moved(w_hat, delta, blocksize=64):
    before = nf4.quantize_nf4(w_hat, blocksize).codes
    after = nf4.quantize_nf4(w_hat + delta, blocksize).codes
    return (before != after).float().mean().item()


def codes_kept(w_hat, delta, blocksize=64):
    return 1.0 - codes_moved(w_hat, delta, blocksize)


def codes_moved_old_absmax(w_hat, delta, blocksize=64):
    state = nf4.quantize_nf4(w_hat, blocksize)
    codes, absmax = state.codes, state.absmax
    scaled = ((w_hat + delta).reshape(-1, blocksize) / absmax.unsqueeze(1)).clamp(-1, 1)  # (blocks, blocksize)
    table = nf4.codebook()
    after = torch.bucketize(scaled, (table[:-1] + table[1:]) / 2).reshape(w_hat.shape)
    return (after != codes.long()).float().mean().item()


def combine_cat(As, Bs, scalings, weights):
    A = torch.cat([w * s * A_i for A_i, s, w in zip(As, scalings, weights)], dim=0)
    return A, torch.cat(list(Bs), dim=1)


def combine_cat_squared_weights(As, Bs, scalings, weights):
    A = torch.cat([w * s * A_i for A_i, s, w in zip(As, scalings, weights)], dim=0)
    return A, torch.cat([w * B_i for B_i, w in zip(Bs, weights)], dim=1)


def combine_cat_no_scaling(As, Bs, scalings, weights):
    return combine_cat(As, Bs, [1.0] * len(As), weights)


def combine_cat_wrong_dims(As, Bs, scalings, weights):
    return torch.cat(As, dim=1), torch.cat(Bs, dim=0)


def fold_shift(zero_point, scale, shift):
    return zero_point - shift / scale


def fold_shift_wrong_sign(zero_point, scale, shift):
    return zero_point + shift / scale


def fold_shift_no_scale(zero_point, scale, shift):
    return zero_point - shift


def fold_shift_rounded(zero_point, scale, shift):
    return torch.round(zero_point - shift / scale)  # GPTQ's integer zero points


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise 7.k: your code here")


CHECKERS = [nb08.bf16_half_spacing, nb08.codes_moved, nb08.combine_cat, nb08.fold_shift]


@pytest.mark.parametrize(("checker", "solution"), [
    (nb08.bf16_half_spacing, bf16_half_spacing),
    (nb08.codes_moved, codes_moved),
    (nb08.combine_cat, combine_cat),
    (nb08.fold_shift, fold_shift),
])
def test_correct_solution_passes(checker, solution, capsys):
    result = checker(solution)
    assert result.passed, result.message
    assert capsys.readouterr().out.startswith("[qlearn.check] PASSED 8.")


@pytest.mark.parametrize(("checker", "wrong", "hint"), [
    (nb08.bf16_half_spacing, bf16_full_spacing, "at most half the spacing"),
    (nb08.bf16_half_spacing, fp16_half_spacing, "7 explicit mantissa bits"),
    (nb08.codes_moved, codes_kept, "count codes_before != codes_after"),
    (nb08.codes_moved, codes_moved_old_absmax, "NEW absmax per block"),
    (nb08.combine_cat, combine_cat_squared_weights, "on ONE side"),
    (nb08.combine_cat, combine_cat_no_scaling, "fold s_i into A_i"),
    (nb08.combine_cat, combine_cat_wrong_dims, "along the rank dimension (dim 0)"),
    (nb08.fold_shift, fold_shift_wrong_sign, "subtract D / scale"),
    (nb08.fold_shift, fold_shift_no_scale, "divide the shift by the group's scale"),
    (nb08.fold_shift, fold_shift_rounded, "keep z' as a float"),
])
def test_typical_mistake_fails_with_its_hint(checker, wrong, hint, capsys):
    result = checker(wrong)
    assert result.status == "FAILED" and hint in result.message, result.message
    assert capsys.readouterr().out.startswith("[qlearn.check] FAILED 8.")


@pytest.mark.parametrize("checker", CHECKERS)
def test_stub_is_not_attempted(checker, capsys):
    assert checker(stub).status == "NOT ATTEMPTED"
    assert "NOT ATTEMPTED" in capsys.readouterr().out


def test_half_spacing_answer_bounds_torch_bf16_rounding_and_is_reached():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    err = (x.to(torch.bfloat16).float() - x).abs()
    bound = bf16_half_spacing(x)
    assert (err <= bound).all()
    assert (err / bound).max() > 0.99  # tight: some values sit next to a midpoint


def test_codes_moved_answer_is_qlearn_merging_requantize():
    from qlearn.merging import requantize

    for w_hat, delta, blocksize, _ in nb08._cases():
        assert codes_moved(w_hat, delta, blocksize) == pytest.approx(1 - requantize(w_hat, delta, blocksize).unchanged,
                                                                     abs=1e-12)


def test_codes_moved_cases_tell_the_old_absmax_mistake_apart():
    moved = [codes_moved(w, d, b) for w, d, b, _ in nb08._cases()]
    old = [codes_moved_old_absmax(w, d, b) for w, d, b, _ in nb08._cases()]
    assert moved[-1] > 0.5 and old[-1] == 0.0  # the case whose absmax grows by half


def test_combine_cat_answer_is_peft_add_weighted_adapter():
    peft = pytest.importorskip("peft")
    from torch import nn

    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(6, 5)), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]),
                                adapter_name="one")
    model.add_adapter("two", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["0"]))
    layer = model.base_model.model[0]
    for name in ("one", "two"):  # B = 0 would make the comparison trivial
        nn.init.normal_(layer.lora_B[name].weight)
    model.add_weighted_adapter(["one", "two"], [0.7, -0.4], "mix", combination_type="cat")
    names = ["one", "two"]
    A, B = combine_cat([layer.lora_A[n].weight.data for n in names], [layer.lora_B[n].weight.data for n in names],
                       [layer.scaling[n] for n in names], [0.7, -0.4])
    torch.testing.assert_close(A, layer.lora_A["mix"].weight.data)  # the same products in the same order
    torch.testing.assert_close(B, layer.lora_B["mix"].weight.data)


def test_fold_shift_answer_is_qalora_merge():
    from qlearn import qalora
    from qlearn.quant import quantize

    g = torch.Generator().manual_seed(0)
    layer = qalora.QALoRALinear(quantize(torch.randn(8, 32, generator=g), 4, symmetric=False, group_size=8), r=2)
    with torch.no_grad():
        layer.B.normal_(generator=g)  # B = 0 would make the shift zero
    qw = layer.base.qweight
    got = fold_shift(qw.zero_point, qw.scale, layer.group_shift().unsqueeze(-1).detach())
    assert torch.equal(got, layer.merge().zero_point)  # the same two float32 operations
