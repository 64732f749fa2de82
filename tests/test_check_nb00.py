"""The notebook 00 checkers: a correct answer passes, each typical mistake fails with the hint aimed at
it, a stub is reported as not attempted."""

import pytest

from qlearn.check import nb00


def largest_model(memory_gb, bits):
    return memory_gb * 1e9 / (bits / 8)


def training_gb(n_params, param_bytes=2, master_bytes=4, states=2, state_bytes=4):
    return n_params * (param_bytes + param_bytes + master_bytes + states * state_bytes) / 1e9


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise 0.x")


@pytest.mark.parametrize("checker,answer", [(nb00.largest_model, largest_model), (nb00.training_gb, training_gb)])
def test_a_correct_answer_passes_and_a_stub_is_not_attempted(checker, answer, capsys):
    assert checker(answer).passed
    assert checker(stub).status == "NOT ATTEMPTED"
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[qlearn.check] PASSED 0.") and out[1].startswith("[qlearn.check] NOT ATTEMPTED 0.")


@pytest.mark.parametrize("wrong,hint", [
    (lambda gb, bits: gb * 1e9 * bits / 8, "divide by it"),
    (lambda gb, bits: gb / (bits / 8), "billions of parameters"),
    (lambda gb, bits: gb * 2**30 / (bits / 8), "not a GiB"),
    (lambda gb, bits: gb * 1e9 / bits, "8 times too small"),
    (lambda gb, bits: gb * 1e9 / bits * 3, "memory_gb x 1e9 / (bits / 8)"),
    (lambda gb, bits: "32 billion", "expected a number"),
])
def test_largest_model_mistakes_get_their_hint(wrong, hint):
    result = nb00.largest_model(wrong)
    assert result.status == "FAILED" and hint in result.message, result.message


@pytest.mark.parametrize("wrong,hint", [
    (lambda n, param_bytes=2, master_bytes=4, states=2, state_bytes=4:
     n * (param_bytes + master_bytes + states * state_bytes) / 1e9, "count the gradients"),
    (lambda n, param_bytes=2, master_bytes=4, states=2, state_bytes=4:
     n * (2 * param_bytes + master_bytes + state_bytes) / 1e9, "states x state_bytes"),
    (lambda n, param_bytes=2, master_bytes=4, states=2, state_bytes=4:
     n * (2 * param_bytes + states * state_bytes) / 1e9, "add the master copy"),
    (lambda n, param_bytes=2, master_bytes=4, states=2, state_bytes=4:
     n * (2 * param_bytes + master_bytes + states * state_bytes), "divide the bytes by 1e9"),
    (lambda n, param_bytes=2, master_bytes=4, states=2, state_bytes=4: 112.0, "for pure bf16 AdamW"),
])
def test_training_gb_mistakes_get_their_hint(wrong, hint):
    result = nb00.training_gb(wrong)
    assert result.status == "FAILED" and hint in result.message, result.message


def test_training_gb_names_the_case_that_failed():
    result = nb00.training_gb(lambda n, **kw: 112.0)  # right only for the defaults
    assert result.message.startswith("training_gb(7e+09, param_bytes=2, master_bytes=0, states=2, state_bytes=2) "
                                     "for pure bf16 AdamW: expected 56, got 112")
