"""NF4 and bitsandbytes-FP4: 4-bit code books, blockwise absmax quantization, double quantization.

A 4-bit code book is a table of 16 numbers in [-1, 1]. Blockwise absmax quantization (QLoRA, Sec. 3)
cuts the flattened tensor into blocks of `blocksize` values and, for block b,

    absmax_b = max_i |w_i|                                   (stored as float32)
    code_i   = argmin_k |w_i / absmax_b - table[k]|          (4 bits: an index into the table)
    w_hat_i  = table[code_i] * absmax_b

The nearest entry is found with `bucketize` on the midpoints between sorted table entries, the same
steps as bitsandbytes' pure-PyTorch 4-bit reference, so the codes and `w_hat` are bit for bit those
of `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit` (checked in tests/test_nf4.py).

Storage per parameter: 4 bits + 32 / blocksize bits of float32 absmax (4.5 bits for blocks of 64).
Double quantization (QLoRA's "DQ") stores the absmax values in 8 bits: subtract their mean, then
blockwise-quantize them in blocks of 256 with bitsandbytes' signed 8-bit "dynamic" code book:

    bits per parameter = 4 + 8 / 64 + 32 / (64 * 256) = 4.127    (0.373 bits saved)

Every quantizer here returns a `Blockwise` state (qlearn.quant.state's protocol): the codes, the
block scales (or their double-quantized form, a nested `DoubleQuant`), the table, the blocksize, the
shape and dtype; `.dequantize()` recomputes table[code] * absmax every time (no cached output), as one
gather from each block's own 16 values table * absmax_b, rounded once to the output dtype: the same
bits as bitsandbytes, which computes in float32 and rounds at the end, in one pass over memory.

Two code books live here:
- `codebook()`: NF4, quantiles of N(0, 1) (8 positive, 7 negative, one exact zero).
- `fp4_codebook()`: bitsandbytes' "fp4", which is NOT the OCP E2M1 format (see its docstring).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .state import QuantState, storage_bits

__all__ = ["NF4_OFFSET", "QUANT_TYPES", "Blockwise", "DoubleQuant", "codebook", "dequantize_blockwise",
           "double_quantize", "dynamic_codebook", "e2m1_codebook", "fp4_codebook", "quantize_blockwise",
           "quantize_fp4", "quantize_nf4"]

# QLoRA: the outermost quantile is 1 - delta with delta = (1/(2*16) + 1/(2*15)) / 2, half-way between
# the bin-centre offsets of a 16-level and a 15-level code, so that +-1 is finite. bitsandbytes rounds
# it to 7 decimals, 0.9677083; we do the same to get its table bit for bit.
NF4_OFFSET = round(1.0 - 0.5 * (1 / 32 + 1 / 30), 7)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@functools.cache
def _nf4_table() -> Tensor:
    return _build_nf4()


def codebook() -> Tensor:
    """The NF4 code book (a copy of the cached table): see `_build_nf4`."""
    return _nf4_table().clone()


def _build_nf4() -> Tensor:
    """The 16 NF4 values (sorted, float32), built from quantiles of N(0, 1) as in QLoRA, Sec. 3.

    Bit for bit `bitsandbytes.functional.get_4bit_type("nf4")`, which hard-codes the table to avoid
    depending on scipy; torch's `Normal.icdf` (float64) replaces scipy's `norm.ppf` here. Matching
    the last bit takes bitsandbytes' recipe: float32 probabilities, float64 quantiles, float32 division.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64))
    # Step 1: 9 equally spaced probabilities from the offset down to 0.5; drop 0.5 itself (its
    # quantile is 0, added once in Step 3): 8 positive quantiles.
    p_positive = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1]
    positive = normal.icdf(p_positive.double())
    # Step 2: the same with 8 probabilities: 7 negative quantiles. Asymmetric halves (8 + 7 + zero
    # = 16) are what lets the code book contain an exact zero with 4 bits.
    p_negative = torch.linspace(NF4_OFFSET, 0.5, 8)[:-1]
    negative = -normal.icdf(p_negative.double())
    # Step 3: one shared exact zero; sort.
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values.float()
    # Step 4: normalize into [-1, 1]: the largest quantile becomes exactly 1 (the smallest is -1 too,
    # since both halves start from the same outermost quantile).
    return values / values.max()


def fp4_codebook() -> Tensor:
    """bitsandbytes' "fp4" table (float32), indexed by the 4-bit code bitsandbytes stores.

    It is bitsandbytes' own 16-value code book, not the OCP E2M1 format of `e2m1_codebook()`:
    magnitudes {0, 0.0625, 2, 3, 4, 6, 8, 12} / 12 against E2M1's {0, 0.5, 1, 1.5, 2, 3, 4, 6} / 6.
    After normalizing to [-1, 1] the two share 14 of 16 values; they differ in the smallest
    non-zero magnitude (0.0052 here, 0.0833 in E2M1) and in which bit pattern means which value
    (code 0b0010 is 8/12 here; in E2M1 0b0010 is 1/6). Code i -> table[i]; bit 3 is the sign.
    The hard-coded values are bitsandbytes' `get_4bit_type("fp4")` (compared in tests).
    """
    magnitudes = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])  # codes 0b000..0b111
    return torch.cat([magnitudes, -magnitudes]) / 12.0


def e2m1_codebook() -> Tensor:
    """The OCP MX FP4 (E2M1) values in bit-pattern order, normalized to [-1, 1] (divided by 6).

    1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit: 0b0000..0b0111 = 0, 0.5, 1, 1.5, 2, 3, 4, 6.
    """
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    return torch.cat([magnitudes, -magnitudes]) / 6.0


@functools.cache
def _dynamic_table() -> Tensor:
    return _build_dynamic()


def dynamic_codebook() -> Tensor:
    """bitsandbytes' dynamic 8-bit code book (a copy of the cached table): see `_build_dynamic`."""
    return _dynamic_table().clone()


def _build_dynamic() -> Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code book (256 sorted float32 values in [-1, 1]).

    Dettmers (2015), "8-bit approximations": a decimal exponent 10^(i-6) for i = 0..6 and, for
    exponent i, 2^i linear fractions (midpoints of a grid over [0.1, 1]); both signs, plus 0 and 1.
    Small magnitudes get fine steps and large ones coarse steps; used for double quantization.
    Equal to `bitsandbytes.functional.create_dynamic_map()` (bit for bit; tested).
    """
    values = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        # Step 1: 2^i + 1 grid points in [0.1, 1]; their 2^i midpoints are the fractions.
        grid = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        fractions = (grid[:-1] + grid[1:]) / 2
        # Step 2: scale by the decimal exponent; add both signs.
        values += [10.0 ** (i - 6) * fractions, -(10.0 ** (i - 6)) * fractions]
    return torch.cat(values).sort().values  # 2 + 2 * (1 + 2 + ... + 64) = 256 values


QUANT_TYPES = {"nf4": codebook, "fp4": fp4_codebook, "e2m1": e2m1_codebook, "dynamic": dynamic_codebook}


@functools.cache
def _table_on(quant_type: str, device: torch.device) -> Tensor:
    """A named code book on `device`, built once per (name, device)."""
    return QUANT_TYPES[quant_type]().to(device)


def _check_input(w: Tensor, name: str = "w") -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty: nothing to quantize")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains NaN or inf; blockwise absmax quantization needs finite values")


def _check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int (bitsandbytes uses 64 for weights), "
                         f"got {blocksize!r}")


def _blocks(flat: Tensor, blocksize: int) -> Tensor:
    """(n,) -> (n_blocks, blocksize), the last block padded with zeros (zeros do not change absmax)."""
    pad = -flat.numel() % blocksize
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, blocksize)


@dataclass(repr=False)
class DoubleQuant(QuantState):
    """QLoRA's double-quantized block scales: 8-bit codes of (absmax - offset) in blocks of `blocksize`
    with the dynamic code book, a float32 scale per block (`absmax`), and the float32 `offset`.

        absmax_1 ~= dynamic[codes] * absmax_2 + offset"""

    codes: Tensor   # uint8, one 8-bit code per first-level absmax
    absmax: Tensor  # float32, one second-level scale per block of `blocksize` first-level absmax values
    offset: Tensor  # float32 scalar, the mean subtracted before quantizing
    blocksize: int = 256
    bits: int = 8
    granularity = "blockwise(dynamic 8-bit)"

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    dtype = torch.float32

    def _values(self) -> Tensor:
        return dequantize_blockwise(self.codes, self.absmax, _table_on("dynamic", self.codes.device),
                                    self.blocksize) + self.offset

    def storage_bits(self) -> float:
        """8 bits per code + 32 per second-level scale + 32 for the offset."""
        return storage_bits(self.codes.numel(), 8, scales=self.absmax.numel(), scale_bits=32, tensor_bits=32)


@dataclass(repr=False)
class Blockwise(QuantState):
    """Codes into a code book plus per-block absmax: w_hat_i = table[code_i] * absmax_b (module docstring).

    `absmax` holds the float32 block scales, or is None when they are double-quantized into `nested`."""

    codes: Tensor              # uint8, the input's shape, indices into `table`
    absmax: Tensor | None      # float32, one per block of the flattened input (None: see `nested`)
    table: Tensor              # float32 code book (16 values for 4-bit codes)
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str = "custom"  # "nf4", "fp4" (bitsandbytes), "e2m1", "dynamic" or "custom"
    nested: DoubleQuant | None = None

    def __post_init__(self):  # checked once here, so that dequantize() needs no host sync
        _check_blocksize(self.blocksize)
        if not isinstance(self.codes, Tensor) or self.codes.dtype != torch.uint8:
            raise TypeError(f"codes must be a uint8 torch.Tensor, got {getattr(self.codes, 'dtype', type(self.codes))}")
        if self.codes.numel() and int(self.codes.max()) >= self.table.numel():
            raise ValueError(f"codes must be < {self.table.numel()} (the table's size), got {int(self.codes.max())}")
        n_blocks = math.ceil(self.codes.numel() / self.blocksize)
        scales = self.absmax if self.nested is None else self.nested.codes
        if scales is None or scales.numel() != n_blocks:
            raise ValueError(f"absmax has {getattr(scales, 'numel', lambda: 0)()} values but {self.codes.numel()} "
                             f"codes in blocks of {self.blocksize} need {n_blocks}: was the same blocksize used?")

    @property
    def bits(self) -> int:
        return max(1, (self.table.numel() - 1).bit_length())  # 16 entries -> 4 bits

    @property
    def granularity(self) -> str:
        return f"blockwise({self.blocksize}){' + double quant' if self.nested is not None else ''}"

    def scales(self) -> Tensor:
        """The float32 absmax of every block (rebuilt from the 8-bit codes when double-quantized)."""
        return self.absmax if self.nested is None else self.nested.dequantize()

    def _values(self) -> Tensor:
        return dequantize_blockwise(self.codes, self.scales(), self.table, self.blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """table[codes] * absmax, computed in float32 and rounded once to `dtype` (default: the
        quantized tensor's), as bitsandbytes' dequantize_4bit does; the codes' shape."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
        return dequantize_blockwise(self.codes, self.scales(), self.table, self.blocksize, dtype or self.dtype)

    def storage_bits(self) -> float:
        """bits per code + 32 per float32 absmax, or the nested state's bits when double-quantized."""
        if self.nested is None:
            return storage_bits(self.codes.numel(), self.bits, scales=self.absmax.numel(), scale_bits=32)
        return storage_bits(self.codes.numel(), self.bits) + self.nested.storage_bits()

    def _repr_fields(self) -> str:
        return f"quant_type={self.quant_type!r}"


def quantize_blockwise(w: Tensor, table: Tensor, blocksize: int = 64, *, quant_type: str = "custom") -> Blockwise:
    """Blockwise absmax quantization of `w` to the nearest entries of `table` (any size up to 256).

    Returns a `Blockwise` state: codes uint8 with w's shape (indices into `table`), absmax float32 with
    one value per block of the flattened `w` (the last block may be shorter).
    """
    _check_input(w)
    _check_blocksize(blocksize)
    if not isinstance(table, Tensor) or not table.is_floating_point() or not 2 <= table.numel() <= 256:
        raise ValueError(f"table must be a float tensor of 2..256 values, got {getattr(table, 'shape', table)!r}")
    # Step 1: flatten and cut into blocks; compute in float32 whatever w's dtype (as bitsandbytes).
    blocks = _blocks(w.reshape(-1).float(), blocksize)  # (n_blocks, blocksize)
    # Step 2: one absmax per block; scale each block into [-1, 1]. An all-zero block has absmax 0:
    # the clamp keeps 1/absmax finite and its values stay 0.
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1)
    # Step 3: nearest table entry = bucketize on the midpoints between sorted entries; `order`
    # maps a sorted position back to the table's own index (needed for bitsandbytes' fp4 order).
    table = table.float().to(w.device)  # the code book is built on the CPU; w may live on a GPU
    order = torch.argsort(table, stable=True)
    midpoints = (table[order[:-1]] + table[order[1:]]) / 2
    codes = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    # Step 4: drop the padding, give the codes w's shape.
    codes = codes.reshape(-1)[: w.numel()].reshape(w.shape)
    return Blockwise(codes, absmax, table, blocksize, w.shape, w.dtype, quant_type)


def dequantize_blockwise(codes: Tensor, absmax: Tensor, table: Tensor, blocksize: int = 64,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """table[codes] * absmax of each block, with the codes' shape, in `dtype`.

    In one gather: each block b has its own values table * absmax_b (n_blocks x len(table)), rounded
    once to `dtype` (the same bits as multiplying in float32 and rounding at the end, as bitsandbytes'
    kernels do); every code then picks one of its block's values. No host sync, one pass over the codes.
    """
    n_blocks = math.ceil(codes.numel() / blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax has {absmax.numel()} values but {codes.numel()} codes in blocks of "
                         f"{blocksize} need {n_blocks}: was the same blocksize used to quantize?")
    values = (table.to(absmax.device).float().unsqueeze(0) * absmax.float().unsqueeze(1)).to(dtype)  # (n_blocks, K)
    flat = codes.reshape(-1)
    pad = -flat.numel() % blocksize
    index = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(n_blocks, blocksize).long()
    w_hat = torch.gather(values, 1, index)  # (n_blocks, blocksize)
    return (w_hat.reshape(-1)[: codes.numel()] if pad else w_hat).reshape(codes.shape)


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = False) -> Blockwise:
    """NF4: codes uint8 in 0..15 of w's shape and one float32 absmax per block (double-quantized to 8 bits
    with `double_quant=True`, QLoRA's DQ: `bits_per_param()` 4.5 -> about 4.127 at blocksize 64).

    The codes are bit for bit those bitsandbytes packs two per byte in `quantize_4bit(w, blocksize,
    quant_type="nf4")` (its first code is the high nibble), and `.dequantize()` equals its
    `dequantize_4bit` bit for bit (without double quantization; with it, see `double_quantize`).
    """
    state = quantize_blockwise(w, _table_on("nf4", torch.device("cpu")), blocksize, quant_type="nf4")
    return _maybe_double_quantize(state, double_quant)


def quantize_fp4(w: Tensor, blocksize: int = 64, double_quant: bool = False) -> Blockwise:
    """bitsandbytes-FP4 (`fp4_codebook()`, not E2M1): same contract as `quantize_nf4`."""
    state = quantize_blockwise(w, _table_on("fp4", torch.device("cpu")), blocksize, quant_type="fp4")
    return _maybe_double_quantize(state, double_quant)


def _maybe_double_quantize(state: Blockwise, double_quant: bool) -> Blockwise:
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    if double_quant:
        return replace(state, absmax=None, nested=double_quantize(state.absmax))
    return state


def double_quantize(absmax: Tensor, blocksize: int = 256) -> DoubleQuant:
    """QLoRA's double quantization of the first-level scales: a `DoubleQuant` (codes, absmax2, offset).

        offset  = mean(absmax)
        codes, absmax2 = blockwise 8-bit quantization of (absmax - offset), `dynamic_codebook()`,
                         blocks of `blocksize` (256 in QLoRA and bitsandbytes)
        absmax ~= dynamic_codebook()[codes] * absmax2 + offset           (`.dequantize()`)

    This is what `bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)` stores
    (`quant_state.absmax` = codes, `.state2.absmax` = absmax2, `.offset` = offset). The offset and
    absmax2 agree bit for bit; the codes agree except at near-ties (about 1 in 500 values): bitsandbytes'
    CPU kernel finds the code with an approximate binary search and a two-neighbour check, and at a
    near-tie can keep the second-nearest code; this module always takes the nearest.
    Subtracting the mean centres the (all positive) scales so the signed code book is used fully.
    """
    _check_input(absmax, "absmax")
    if absmax.dim() != 1:
        raise ValueError(f"absmax must be 1-D (one scale per block), got shape {tuple(absmax.shape)}")
    absmax = absmax.float()
    # Step 1: the mean, kept in float32 (32 bits per tensor).
    offset = absmax.mean()
    # Step 2: 8-bit blockwise quantization of the centred scales with the dynamic code book.
    inner = quantize_blockwise(absmax - offset, _table_on("dynamic", torch.device("cpu")), blocksize,
                               quant_type="dynamic")
    return DoubleQuant(inner.codes, inner.absmax, offset, blocksize)
