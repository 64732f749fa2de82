"""The quantized-state protocol every quantizer in qlearn returns, and the one storage formula.

A quantized tensor is data plus what is needed to undo it (bitsandbytes' packed data + QuantState,
torchao's MXTensor). Every qlearn quantizer returns a `QuantState`:

    state.dequantize(dtype=None) -> Tensor   the values it stands for, in the original shape
                                             (and the original dtype unless `dtype` is given)
    state.storage_bits()         -> int      bits to store it: codes, scales, zero points, nested scales
    state.bits_per_param()       -> float    storage_bits() / numel
    repr(state)                              bits, granularity, shape, dtype

The states: `linear.QTensor` (integer grids: quantize, RTN, GPTQ, AWQ, HQQ, QAT's convert),
`nf4.Blockwise` (code books in blocks: NF4, bitsandbytes-FP4, E2M1, the 8-bit dynamic map),
`codebook.Codebook` (a learned k-means table), `qlearn.formats.mx.MXState` (MX and NVFP4) and
`qlearn.formats.fp8.FP8State` (scaled FP8: tensorwise, rowwise, blockwise).

Storage, the one formula (N values, b bits per code, S scales of s bits, Z zero points of z bits,
S2 second-level scales of s2 bits, t bits per tensor):

    storage_bits   = N b + S s + Z z + S2 s2 + t
    bits_per_param = b + (s + z) / B + s2 / (B B2) + t / N      with blocks of B = N / S values
                                                                 and second-level blocks of B2 scales

e.g. 4-bit groups of 64 with an fp16 scale and zero point: 4 + 32/64 = 4.5; NF4 with double
quantization: 4 + 8/64 + 32/(64 x 256) = 4.127; MXFP4: 4 + 8/32 = 4.25; NVFP4: 4 + 8/16 + 32/N.
`qlearn.memory.bits_per_param` answers from the same function, `bits_per_param` below.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["QuantState", "bits_per_param", "storage_bits"]


def storage_bits(numel: int, code_bits: float, *, scales: int = 0, scale_bits: float = 0,
                 zero_points: int = 0, zero_point_bits: float = 0, nested_scales: int = 0,
                 nested_scale_bits: float = 0, tensor_bits: float = 0) -> float:
    """N b + S s + Z z + S2 s2 + t (module docstring): the bits a quantized tensor takes."""
    return (numel * code_bits + scales * scale_bits + zero_points * zero_point_bits
            + nested_scales * nested_scale_bits + tensor_bits)


def bits_per_param(code_bits: float, block_size: int | None = None, *, scale_bits: float = 0,
                   zero_point_bits: float = 0, nested_block_size: int | None = None,
                   nested_scale_bits: float = 0, tensor_bits: float = 0, numel: int | None = None) -> float:
    """b + (s + z) / B + s2 / (B B2) + t / N: `storage_bits` per value for blocks of B values whose
    scales are grouped B2 at a time; `tensor_bits` counts only when `numel` is given."""
    for name, value in (("block_size", block_size), ("nested_block_size", nested_block_size), ("numel", numel)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    n = numel if numel is not None else math.lcm(block_size or 1, (block_size or 1) * (nested_block_size or 1))
    scales = n / block_size if block_size else 0
    nested = scales / nested_block_size if nested_block_size else 0
    total = storage_bits(n, code_bits, scales=scales, scale_bits=scale_bits, zero_points=scales if zero_point_bits else 0,
                         zero_point_bits=zero_point_bits, nested_scales=nested, nested_scale_bits=nested_scale_bits,
                         tensor_bits=tensor_bits if numel is not None else 0)
    return total / n


class QuantState:
    """Base of every quantized state. A subclass (usually a dataclass) has the attributes `shape`,
    `dtype` and `bits` (bits per code) and a `granularity` string, and implements `_values()` (float32,
    original shape or any shape with as many values) and `storage_bits()`."""

    def _values(self) -> Tensor:
        raise NotImplementedError

    def storage_bits(self) -> float:
        raise NotImplementedError

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The values this state stands for, in the original shape, rounded once to `dtype`
        (default: the dtype of the tensor that was quantized)."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
        return self._values().reshape(self.shape).to(dtype or self.dtype)

    def bits_per_param(self) -> float:
        """storage_bits() / numel: codes, scales, zero points and nested scales, per value."""
        return self.storage_bits() / self.numel

    def nbytes(self) -> int:
        """storage_bits() rounded up to whole bytes."""
        return math.ceil(self.storage_bits() / 8)

    def _repr_fields(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self._repr_fields()
        return (f"{type(self).__name__}(bits={self.bits:g}, {self.granularity}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype}{', ' + extra if extra else ''}, "
                f"bits_per_param={self.bits_per_param():.4g})")
