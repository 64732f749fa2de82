"""The notebook 03 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted."""

import pytest
import torch

from qlearn.check import nb03


def nf4_codebook():
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 1 - 0.5 * (1 / 32 + 1 / 30)
    positive = normal.icdf(torch.linspace(offset, 0.5, 9)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8)[:-1])
    values = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return values / values.max()


def nf4_codebook_symmetric():  # the usual mistake: 8 + 8 quantiles, no exact zero
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(0.9677083, 0.5, 9)[:-1])
    values = torch.cat([-positive, positive]).sort().values
    return values / values.max()


def nf4_codebook_unnormalized():
    return nf4_codebook() * 1.848


def blockwise_quantize(w, table, blocksize):
    flat = w.reshape(-1)
    codes, absmax = [], []
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        a = block.abs().max()
        codes.append((block[:, None] / a - table[None, :]).abs().argmin(dim=1))
        absmax.append(a)
    return torch.cat(codes).to(torch.uint8).reshape(w.shape), torch.stack(absmax)


def blockwise_quantize_global_absmax(w, table, blocksize):  # the usual mistake: one absmax for all
    codes, _ = blockwise_quantize(w.reshape(-1), table, w.numel())
    n_blocks = -(-w.numel() // blocksize)
    return codes.reshape(w.shape), w.abs().max().repeat(n_blocks)


def blockwise_quantize_no_tail(w, table, blocksize):  # drops the last, shorter block
    codes, absmax = blockwise_quantize(w, table, blocksize)
    return codes, absmax[: w.numel() // blocksize]


def gptq_update(W, U, j, q):
    err = (W[:, j] - q) / U[j, j]
    W[:, j] = q
    W[:, j + 1:] -= torch.outer(err, U[j, j + 1:])
    return W


def gptq_update_column_of_u(W, U, j, q):  # the usual mistake: U's column instead of its row
    err = (W[:, j] - q) / U[j, j]
    W[:, j] = q
    W[:, j + 1:] -= torch.outer(err, U[j + 1:, j])
    return W


def gptq_update_no_pivot(W, U, j, q):
    err = W[:, j] - q
    W[:, j] = q
    W[:, j + 1:] -= torch.outer(err, U[j, j + 1:])
    return W


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise 3.k: your code here")


@pytest.mark.parametrize(("checker", "solution"), [
    (nb03.nf4_codebook, nf4_codebook),
    (nb03.blockwise_quantize, blockwise_quantize),
    (nb03.gptq_update, gptq_update),
])
def test_correct_solution_passes(checker, solution, capsys):
    result = checker(solution)
    assert result.passed, result.message
    assert capsys.readouterr().out.startswith("[qlearn.check] PASSED 3.")


@pytest.mark.parametrize(("checker", "wrong", "hint"), [
    (nb03.nf4_codebook, nf4_codebook_symmetric, "8 and 8"),
    (nb03.nf4_codebook, nf4_codebook_unnormalized, "divide by the largest value"),
    (nb03.blockwise_quantize, blockwise_quantize_global_absmax, "one absmax = max |w| per block"),
    (nb03.blockwise_quantize, blockwise_quantize_no_tail, "the last block may be shorter"),
    (nb03.gptq_update, gptq_update_column_of_u, "use row j of U"),
    (nb03.gptq_update, gptq_update_no_pivot, "divide by the pivot"),
])
def test_typical_mistake_fails_with_its_hint(checker, wrong, hint, capsys):
    result = checker(wrong)
    assert result.status == "FAILED" and hint in result.message
    assert capsys.readouterr().out.startswith("[qlearn.check] FAILED 3.")


@pytest.mark.parametrize("checker", [nb03.nf4_codebook, nb03.blockwise_quantize, nb03.gptq_update])
def test_stub_is_not_attempted(checker, capsys):
    assert checker(stub).status == "NOT ATTEMPTED"
    assert "NOT ATTEMPTED" in capsys.readouterr().out


def test_division_and_reciprocal_give_the_same_codes_on_the_fixed_cases():
    # The learner may divide by absmax or multiply by its reciprocal: the checker's cases have no near-tie.
    def reciprocal(w, table, blocksize):
        _, absmax = blockwise_quantize(w, table, blocksize)
        flat = w.reshape(-1)
        scale = torch.repeat_interleave(1.0 / absmax, blocksize)[: flat.numel()]
        return (flat[:, None] * scale[:, None] - table).abs().argmin(1).to(torch.uint8).reshape(w.shape), absmax

    assert nb03.blockwise_quantize(reciprocal).passed
