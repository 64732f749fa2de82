"""qlearn.quant.codebook: k-means beats an evenly spaced grid at the same bits, and never diverges."""

import itertools

import pytest
import torch

from qlearn.quant import quantize
from qlearn.quant.codebook import compare_with_linear, kmeans_quantize


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
    assert all(b <= a + 1e-7 for a, b in itertools.pairwise(errors))  # float32 sums: tiny slack


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


def test_compare_with_linear_reports_both_errors():
    torch.manual_seed(0)
    w = torch.randn(128, 64) * 0.05
    cmp = compare_with_linear(w, 3)
    lin = (quantize(w, 3, symmetric=False).dequantize() - w).pow(2).mean().item()
    assert cmp.linear_mse == pytest.approx(lin, rel=1e-6)  # the same computation, float32 sums
    assert cmp.kmeans_mse < cmp.linear_mse


def test_kmeans_on_two_levels_finds_the_two_clusters():
    x = torch.tensor([-1.0, -1.1, -0.9, 2.0, 2.2, 1.8])
    cb = kmeans_quantize(x, 1)
    assert torch.allclose(cb.table, torch.tensor([-1.0, 2.0]))  # the cluster means
    assert cb.codes.tolist() == [0, 0, 0, 1, 1, 1]


def test_bits_per_param_counts_the_table():
    cb = kmeans_quantize(torch.randn(256, 256), 4)
    assert cb.bits_per_param() == 4 + 16 * 16 / 65536
