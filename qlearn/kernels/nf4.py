"""A readable Triton NF4 dequantize kernel, bit for bit bitsandbytes' `dequantize_4bit`.

For value i of the flattened weight (bitsandbytes' layout, `_state.py`):

    code_i = high nibble of byte i // 2 if i is even, else its low nibble
    W_i    = dtype( table[code_i] * absmax[i // blocksize] )      float32 product, ONE rounding

and, double-quantized, absmax_b = code2[absmax[b]] * absmax2[b // 256] + offset first (float32,
rounded after the product and again after the sum, as bitsandbytes computes it in two steps).

Why it can beat bitsandbytes' CUDA kernel: dequantizing is memory-bound (it reads 0.5 + 4/64 bytes
and writes 2 bytes per bf16 value), so speed is how close it runs to the copy bandwidth: one
program per tile of TILE bytes, each byte read once, each value written once with 16-byte stores.
Bit-exactness: bitsandbytes' kernel computes `table[code] * absmax` in float32 and converts once
(round to nearest even). Two details matter here: the fp32 -> bf16 rounding is written out by hand
(`round_to_bf16`: what the GPU's conversion does, and what Triton's CPU interpreter, which
truncates, would not), and the nested absmax is computed without fusing `*` and `+` into one FMA
(`enable_fp_fusion=False`), since bitsandbytes rounds between them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._state import DTYPES, nf4_weight
from ._triton import check_device, tl, triton

__all__ = ["TILE", "dequantize_4bit", "round_to_bf16"]

# Bytes per program (2048 values); num_warps defaults to TILE // 128: 4 bytes (8 values, one 16-byte
# store of bf16) per thread. benchmarks/nf4_kernel.py shows other sizes.
TILE = 1024


@triton.jit
def round_to_bf16(x):
    """float32 -> bfloat16, rounded to nearest, ties to even (finite x): add 0x7FFF plus the last
    kept bit to the 32 bits, then keep the top 16."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """Round float32 `x` once to `dtype` (nearest even), the same way on a GPU and in the interpreter."""
    if dtype == tl.bfloat16:
        y = round_to_bf16(x)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def block_absmax(absmax_ptr, block, mask, absmax2_ptr, code2_ptr, offset_ptr,
                 BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """absmax of each `block`: stored in float32, or (NESTED) code2[q] * absmax2[block // 256] + offset."""
    if NESTED:  # a compile-time branch: only one of the two is compiled
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        absmax = tl.load(code2_ptr + q) * scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                       n, n_bytes, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       TILE: tl.constexpr):
    # Step 1: this program's TILE bytes (int64: a tensor may hold more than 2^31 values).
    tile = tl.program_id(0).to(tl.int64)
    byte = tile * TILE + tl.arange(0, TILE)                          # (TILE,)
    in_range = byte < n_bytes
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0)
    # Step 2: two codes per byte, the HIGH nibble first (value 2i), as bitsandbytes packs them.
    high = (packed >> 4).to(tl.int32)
    low = (packed & 0xF).to(tl.int32)
    # Step 3: the block's absmax; both values of byte i are in block 2i // BLOCKSIZE (it is even).
    absmax = block_absmax(absmax_ptr, byte // (BLOCKSIZE // 2), in_range, absmax2_ptr, code2_ptr,
                          offset_ptr, BLOCKSIZE2, NESTED)
    # Step 4: look up the 16-value table, scale in float32.
    w_high = tl.load(code_ptr + high) * absmax
    w_low = tl.load(code_ptr + low) * absmax
    # Step 5: back to value order (high, low, high, low, ...), one rounding, store.
    values = tl.interleave(w_high, w_low)                            # (2 * TILE,)
    index = tile * (2 * TILE) + tl.arange(0, 2 * TILE)
    tl.store(out_ptr + index, to_dtype(values, out_ptr.dtype.element_ty), mask=index < n)


def _check_launch(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def dequantize_4bit(packed: Tensor, quant_state=None, *, dtype: torch.dtype | None = None,
                    tile: int | None = None, num_warps: int | None = None) -> Tensor:
    """The weight bitsandbytes stored as (`packed`, `quant_state`), like
    `bitsandbytes.functional.dequantize_4bit(packed, quant_state)` and bit for bit equal to it.

    `packed` is the uint8 tensor from `quantize_4bit` or a Linear4bit's `weight` (whose
    `.quant_state` is used when `quant_state` is None). Returns `quant_state.shape` in
    `quant_state.dtype` (or `dtype`). `tile`: bytes per program (a power of two; default TILE,
    read at each call); num_warps defaults to tile // 128.
    """
    w = nf4_weight(packed, quant_state)
    dtype = dtype or w.dtype
    tile = TILE if tile is None else tile
    _check_launch("dtype", dtype, DTYPES)
    _check_launch("tile", tile, [2**k for k in range(4, 15)])
    num_warps = max(1, min(32, tile // 128)) if num_warps is None else num_warps
    _check_launch("num_warps", num_warps, (1, 2, 4, 8, 16, 32))
    device = check_device(**w.tensors())
    out = torch.empty(w.shape, dtype=dtype, device=device)
    n, n_bytes = out.numel(), w.packed.numel()
    unused = w.absmax  # any pointer: the kernel reads absmax2/code2/offset only when NESTED
    _dequantize_kernel[(triton.cdiv(n_bytes, tile),)](
        w.packed, w.absmax, w.code, out, w.absmax2 if w.nested else unused, w.code2 if w.nested else unused,
        w.offset if w.nested else unused, n, n_bytes, BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2,
        NESTED=w.nested, TILE=tile, num_warps=num_warps, enable_fp_fusion=False)
    return out
