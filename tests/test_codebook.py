"""qlearn.quant.codebook: k-means beats an evenly spaced grid at the same bits, and never diverges."""

import pytest
import torch

from qlearn.quant import quantize
from qlearn.quant.codebook import kmeans_quantize


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_beats_linear_on_gaussian_weights(bits):
    torch.manual_seed(bits)
    w = torch.randn(64, 64)
    km = (kmeans_quantize(w, bits).dequantize() - w).pow(2).mean()
    lin = (quantize(w, bits, symmetric=False).dequantize() - w).pow(2).mean()
    assert km < lin


def test_lloyd_iterations_never_increase_the_error():
    torch.manual_seed(0)
    w = torch.randn(5000) ** 3  # heavy tails
    errors = [(kmeans_quantize(w, 3, iters=i).dequantize() - w).pow(2).mean() for i in range(6)]
    assert all(b <= a + 1e-7 for a, b in zip(errors, errors[1:]))


def test_codes_index_the_table_and_keep_the_shape():
    w = torch.randn(3, 5, 7)
    cb = kmeans_quantize(w, 2)
    assert cb.codes.shape == w.shape and cb.codes.dtype == torch.uint8 and int(cb.codes.max()) < 4
    assert cb.table.shape == (4,) and torch.all(cb.table[1:] >= cb.table[:-1])
    assert torch.equal(kmeans_quantize(w, 2).table, cb.table)  # deterministic


def test_bad_input():
    with pytest.raises(ValueError, match="bits must be an int in 1..8"):
        kmeans_quantize(torch.randn(10), 9)
    with pytest.raises(TypeError, match="floating-point"):
        kmeans_quantize(torch.arange(10), 2)
    with pytest.raises(ValueError, match="NaN"):
        kmeans_quantize(torch.tensor([float("nan"), 1.0]), 2)
    with pytest.raises(ValueError, match="iters"):
        kmeans_quantize(torch.randn(10), 2, iters=-1)
