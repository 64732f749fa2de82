"""Codebook (k-means) quantization: store an index into a small table of values instead of a grid step.

With 2^b centroids c_0 < ... < c_{K-1} (K = 2^b), every value is replaced by its nearest centroid:

    code_i = argmin_k |x_i - c_k|          (b bits)
    x_hat  = c[code_i]

and Lloyd's algorithm (1-D k-means) moves each centroid to the mean of the values assigned to it,
which never increases the squared error. Initialised at the quantiles (k + 1/2)/K of x, so the
result is deterministic. Linear quantization is the special case of an evenly spaced table; a
learned table puts more levels where the values are dense (around 0 for weights), so it wins at
the same bits. NF4 (notebook 03/07) is a *fixed* table, chosen once for normally distributed
weights, so no table has to be stored per tensor; AQLM learns *additive* codebooks over groups of
8 weights (a vector is a sum of entries from several tables), reaching ~2 bits per weight.

Storage: b bits per value plus the table, 2^b entries of 16 bits per tensor (negligible for a weight
matrix: 4 bits + 256 / 65536 bits for a 256 x 256 matrix at 4 bits). `compare_with_linear` puts the
squared error of a k-means table next to a linear (min-max, asymmetric) grid with the same number of
levels and the same one-scale-per-tensor storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .linear import quantize
from .state import QuantState, storage_bits

__all__ = ["Codebook", "Comparison", "compare_with_linear", "kmeans_quantize"]


@dataclass(repr=False)
class Codebook(QuantState):
    """A learned table and each value's index into it: x_hat = table[code]."""

    codes: Tensor  # uint8 indices, the input's shape
    table: Tensor  # float32 (2^bits,) sorted centroids
    shape: torch.Size
    dtype: torch.dtype
    table_bits: int = 16  # storage of each table entry (fp16)

    @property
    def bits(self) -> int:
        return max(1, (self.table.numel() - 1).bit_length())

    granularity = "per-tensor table"

    def _values(self) -> Tensor:
        return self.table[self.codes.long()]

    def storage_bits(self) -> float:
        """log2(len(table)) bits per value plus the table (table_bits per entry), once per tensor."""
        return storage_bits(self.codes.numel(), self.bits, tensor_bits=self.table.numel() * self.table_bits)


class Comparison(NamedTuple):
    kmeans_mse: float  # mean squared error of the k-means table
    linear_mse: float  # of an asymmetric per-tensor linear grid with the same 2^bits levels


def _assign(x: Tensor, table: Tensor) -> Tensor:
    """Nearest centroid of each value: bucketize on the midpoints of the sorted table."""
    return torch.bucketize(x, (table[1:] + table[:-1]) / 2)


def kmeans_quantize(x: Tensor, bits: int = 4, iters: int = 20) -> Codebook:
    """A 2^bits-entry table fitted to x by Lloyd's algorithm, and x's codes in it."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x))}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    flat = x.reshape(-1).float()
    k = 2**bits
    # Step 1: centroids at the quantiles (k + 1/2) / K of the data.
    table = torch.quantile(flat[: 2**24], (torch.arange(k) + 0.5) / k)
    for _ in range(iters):
        # Step 2: assign each value to its nearest centroid.
        codes = _assign(flat, table)
        # Step 3: move each centroid to the mean of its values (an empty cluster keeps its place).
        sums = torch.zeros(k).index_add_(0, codes, flat)
        counts = torch.bincount(codes, minlength=k).float()
        table = torch.where(counts > 0, sums / counts.clamp(min=1), table).sort().values
    codes = _assign(flat, table).to(torch.uint8).reshape(x.shape)
    return Codebook(codes, table, x.shape, x.dtype)


def compare_with_linear(x: Tensor, bits: int, iters: int = 20) -> Comparison:
    """Mean squared error of k-means (2^bits centroids) and of linear quantization at the same bits
    (one asymmetric min-max grid for the whole tensor, the same storage: one table or one scale)."""
    km = kmeans_quantize(x, bits, iters)
    lin = quantize(x, bits, symmetric=False)
    x = x.float()
    return Comparison(float((km.dequantize(torch.float32) - x).pow(2).mean()),
                      float((lin.dequantize(torch.float32) - x).pow(2).mean()))
