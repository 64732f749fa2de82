"""The notebook 04 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted."""

import pytest
import torch

from qlearn.check import nb04


def per_token_int8(x):
    s = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-8)
    return torch.round(x / s).clamp(-127, 127).to(torch.int8), s


def per_token_int8_per_tensor(x):  # the usual mistake: one scale for the whole tensor
    s = (x.abs().amax() / 127).clamp(min=1e-8)
    return torch.round(x / s).clamp(-127, 127).to(torch.int8), s


def per_token_int8_zero_row(x):  # divides an all-zero token by a zero scale: NaN codes
    s = x.abs().amax(dim=-1, keepdim=True) / 127
    return torch.round(x / s).clamp(-127, 127).to(torch.int8), s


def outlier_features(x, threshold):
    return torch.nonzero((x.reshape(-1, x.shape[-1]).abs() >= threshold).any(dim=0)).flatten()


def outlier_features_rows(x, threshold):  # the usual mistake: tokens instead of features
    return torch.nonzero((x.reshape(-1, x.shape[-1]).abs() >= threshold).any(dim=1)).flatten()


def outlier_features_no_abs(x, threshold):  # forgets the negative outliers
    return torch.nonzero((x.reshape(-1, x.shape[-1]) >= threshold).any(dim=0)).flatten()


def smoothing_factor(act_absmax, weight, alpha):
    return act_absmax.pow(alpha) / weight.abs().amax(dim=0).pow(1 - alpha)


def smoothing_factor_no_abs(act_absmax, weight, alpha):  # the max of W, not of |W|
    return act_absmax.pow(alpha) / weight.amax(dim=0).pow(1 - alpha)


def smoothing_factor_swapped(act_absmax, weight, alpha):  # the exponents swapped
    return act_absmax.pow(1 - alpha) / weight.abs().amax(dim=0).pow(alpha)


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise 4.k: your code here")


@pytest.mark.parametrize(("checker", "solution"), [
    (nb04.per_token_int8, per_token_int8),
    (nb04.outlier_features, outlier_features),
    (nb04.smoothing_factor, smoothing_factor),
])
def test_a_correct_solution_passes(checker, solution, capsys):
    assert checker(solution).passed
    assert "PASSED" in capsys.readouterr().out


@pytest.mark.parametrize(("checker", "mistake", "hint"), [
    (nb04.per_token_int8, per_token_int8_per_tensor, "one scale for the whole tensor (per-tensor)"),
    (nb04.per_token_int8, per_token_int8_zero_row, "an all-zero token must give codes 0"),
    (nb04.outlier_features, outlier_features_rows, "the rows (tokens) with an outlier"),
    (nb04.outlier_features, outlier_features_no_abs, "negative outliers count"),
    (nb04.smoothing_factor, smoothing_factor_no_abs, "the absolute values of W"),
    (nb04.smoothing_factor, smoothing_factor_swapped, "max|X_j|^alpha / max|W_j|^(1 - alpha)"),
])
def test_a_typical_mistake_fails_with_its_hint(checker, mistake, hint, capsys):
    result = checker(mistake)
    assert result.status == "FAILED"
    assert hint in result.message, result.message
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("checker", [nb04.per_token_int8, nb04.outlier_features, nb04.smoothing_factor])
def test_the_stub_is_not_attempted(checker):
    assert checker(stub).status == "NOT ATTEMPTED"
