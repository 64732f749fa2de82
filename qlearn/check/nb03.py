"""Checkers for notebook 03 (post-training quantization).

3.1 nf4_codebook(fn):        fn() -> 16 float32 values, the NF4 code book built from N(0, 1) quantiles
3.2 blockwise_quantize(fn):  fn(w, table, blocksize) -> (codes uint8 of w's shape, absmax float32 per block)
3.3 gptq_update(fn):         fn(W, U, j, q) -> W after quantizing column j to q with GPTQ's error feedback
"""

from __future__ import annotations

import torch

from . import CheckResult, exercise

__all__ = ["blockwise_quantize", "gptq_update", "nf4_codebook"]


def nf4_codebook(fn) -> CheckResult:
    """Exercise 3.1: the 16 NF4 values, sorted, within 1e-6 of bitsandbytes' table."""
    from qlearn.quant.nf4 import codebook

    with exercise("3.1", "build the NF4 code book") as ex:
        got = fn()
        ex.tensor_like(got, codebook(), "the code book")
        got = got.float()
        ex.true(torch.all(got[1:] >= got[:-1]), "the values should be sorted in increasing order",
                hint="finish with .sort().values")
        ex.true(bool((got == 0).any()), "NF4 has an exact zero; yours has none",
                hint="use 8 positive and 7 negative quantiles plus one 0 (asymmetric halves), "
                     "not 8 and 8")
        ex.true(int((got > 0).sum()) == 8 and int((got < 0).sum()) == 7,
                f"expected 8 positive and 7 negative values, got {int((got > 0).sum())} and "
                f"{int((got < 0).sum())}",
                hint="positive: icdf(linspace(offset, 0.5, 9)[:-1]); negative: -icdf(linspace(offset, 0.5, 8)[:-1])")
        ex.close(got.abs().max(), 1.0, "the largest magnitude", atol=1e-6,
                 hint="divide by the largest value so that the table spans [-1, 1]")
        # 1e-6: float32 vs float64 probabilities move the values by at most 2e-7.
        ex.close(got, codebook(), "the code book", atol=1e-6, rtol=0,
                 hint="offset = 1 - (1/32 + 1/30) / 2 = 0.9677083; quantiles of N(0, 1) from the offset "
                      "down to 0.5")
    return ex.result


def blockwise_quantize(fn) -> CheckResult:
    """Exercise 3.2: blockwise absmax quantization to the nearest code book entry."""
    from qlearn.quant.nf4 import codebook, quantize_blockwise

    table = codebook()
    cases = [
        # 8 values, blocks of 4: block absmax 0.8 and 2.0
        (torch.tensor([0.1, -0.8, 0.4, 0.0, 2.0, -1.0, 0.3, 1.5]), 4),
        # 10 values, blocks of 4: the last block holds only 2 values
        (torch.tensor([[0.5, -0.25, 0.1, 0.9, -0.3], [0.0, 0.05, -0.7, 0.2, 0.6]]), 4),
    ]
    with exercise("3.2", "blockwise absmax quantization") as ex:
        for w, blocksize in cases:
            got = fn(w, table, blocksize)
            ex.true(isinstance(got, tuple) and len(got) == 2, "return a tuple (codes, absmax)")
            codes, absmax = got
            expected = quantize_blockwise(w, table, blocksize)
            expected_codes, expected_absmax = expected.codes, expected.absmax
            tail = w.numel() % blocksize != 0
            ex.close(absmax, expected_absmax, f"absmax for {w.numel()} values in blocks of {blocksize}",
                     atol=0, rtol=0,
                     hint="cut the flattened tensor into blocks; the last block may be shorter (ceil division)"
                     if tail else "one absmax = max |w| per block of the flattened tensor")
            ex.tensor_like(codes, expected_codes, "codes", hint="return the codes with w's shape")
            ex.equal(codes.long(), expected_codes.long(), "codes",
                     hint="divide each block by its absmax, then take the index of the nearest table entry "
                          "(argmin |x - table|, or bucketize on the midpoints)")
    return ex.result


def gptq_update(fn) -> CheckResult:
    """Exercise 3.3: one column of GPTQ with error feedback."""
    W = torch.tensor([[0.30, -0.20, 0.50], [0.10, 0.40, -0.60]])
    U = torch.tensor([[2.0, -0.5, 0.25], [0.0, 1.5, -0.3], [0.0, 0.0, 1.2]])  # upper Cholesky factor of H^-1
    cases = [(0, torch.tensor([0.25, 0.0])), (1, torch.tensor([-0.25, 0.5]))]
    with exercise("3.3", "one GPTQ column update") as ex:
        for j, q in cases:
            got = fn(W.clone(), U, j, q)
            err = (W[:, j] - q) / U[j, j]
            expected = W.clone()
            expected[:, j] = q
            expected[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
            ex.tensor_like(got, expected, f"W after column {j}")
            ex.close(got[:, :j], W[:, :j], f"columns before {j}", atol=1e-7, rtol=0,
                     hint="earlier columns are already quantized: leave them alone")
            ex.close(got[:, j], q, f"column {j}", atol=1e-7, rtol=0, hint="column j becomes q")
            # 1e-6: float32 arithmetic in another order
            ex.close(got, expected, f"W after column {j}", atol=1e-6, rtol=0,
                     hint="err = (W[:, j] - q) / U[j, j]; then W[:, j+1:] -= outer(err, U[j, j+1:]) "
                          "(divide by the pivot, and use row j of U, not column j)")
    return ex.result
