"""A fused NF4 GEMV for decoding: y = W x without materialising W.

For each row m of x (shape (M, K), M small: decoding has M = batch size) and output n:

    y[m, n] = dtype( sum_k table[code(n, k)] * absmax[(n K + k) // blocksize] * x[m, k] )

with products and the sum in float32 and one rounding at the end. W (N x K, bitsandbytes' packed
NF4, `_state.py`: row n is K / 2 contiguous bytes) is read once, as it is stored: each program
walks one row in steps of BLOCK_K columns, its threads 8 columns (4 bytes) each, with the matching
8 entries of x in the same registers (BLOCK_K = 256 x num_warps keeps it so: no shuffles).
Batch-1 decoding is memory-bound: each weight is read once for 2 flops, so time is bytes /
bandwidth, and NF4 is about 0.5 + 4/64 bytes per value against bf16's 2 (3.6x fewer).
Small batches run one program per (weight row, row of x), neighbours sharing the weight row, so
its M reads mostly hit L2; past a few rows, dequantize-then-matmul (tensor cores) wins.

Tolerance against dequantize-then-matmul (`tolerance`): the reference rounds every weight to
`dtype` before multiplying (error <= u |w_k| each, u = 2^-8 for bf16, 2^-11 fp16, 2^-24 fp32),
both sums carry float32 accumulation error (<= K 2^-24 sum |w_k x_k| each, in any order), and both
results are rounded once to dtype (<= u |y| each). So, elementwise,

    |y - y_ref| <= u (|y| + |y_ref|) + (u + 2 K 2^-24) sum_k |w_k| |x_k|

a bound that holds on any GPU and summation order; measured errors sit far below it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._state import DTYPES, nf4_weight
from ._triton import check_device, tl, triton
from .nf4 import block_absmax, to_dtype

__all__ = ["BLOCK_K", "ROWS", "UNROLL", "gemv_4bit", "tolerance"]

# Columns per step, output rows per program, steps unrolled (more loads in flight); the benchmark
# (benchmarks/nf4_kernel.py) shows other choices. num_warps defaults to BLOCK_K // 256.
BLOCK_K, ROWS, UNROLL = 1024, 1, 4
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, y_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                 N, M, K: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                 NESTED: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, UNROLL: tl.constexpr):
    # K is a compile-time constant: one compilation per in_features, a loop of known length.
    # Step 1: this program's ROWS output rows for row m of x (m varies fastest between programs).
    pid = tl.program_id(0)
    m = pid % M
    pair = tl.arange(0, BLOCK_K // 2)                         # byte j of a step: columns 2j, 2j + 1
    for r in range(ROWS):
        n = (pid // M) * ROWS + r
        acc = tl.zeros((BLOCK_K // 2,), dtype=tl.float32)     # partial sums, reduced once per row
        for k0 in tl.range(0, K, BLOCK_K, loop_unroll_factor=UNROLL):
            # Step 2: the step's BLOCK_K / 2 bytes of row n, which starts at byte n K / 2.
            col = k0 // 2 + pair
            ok = (col < K // 2) & (n < N)
            byte = n.to(tl.int64) * (K // 2) + col
            packed = tl.load(packed_ptr + byte, mask=ok, other=0)
            # Step 3: unpack (high nibble = even column), look up the table, scale by the block's absmax.
            absmax = block_absmax(absmax_ptr, byte // (BLOCKSIZE // 2), ok, absmax2_ptr, code2_ptr, offset_ptr,
                                  BLOCKSIZE2, NESTED)
            w_even = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * absmax
            w_odd = tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * absmax
            # Step 4: the matching entries of x, split into even and odd columns.
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_K // 2, 2)))   # (BLOCK_K/2,) each
            # Step 5: multiply-accumulate in float32.
            acc += w_even * x_even + w_odd * x_odd
        # Step 6: sum the row's partial sums, round once, store.
        tl.store(y_ptr + m * N + n, to_dtype(tl.sum(acc, axis=0), y_ptr.dtype.element_ty), mask=n < N)


def _power_of_two(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > high or value & (value - 1):
        raise ValueError(f"{name} must be a power of two from {low} to {high}, got {value!r}")


def gemv_4bit(x: Tensor, packed: Tensor, quant_state=None, *, block_k: int | None = None,
              rows: int | None = None, unroll: int | None = None, num_warps: int | None = None) -> Tensor:
    """x @ W.T for W (out_features N, in_features K) as bitsandbytes stored it, without forming W.

    x: (..., K) in bf16, fp16 or fp32 (a few rows: decoding); returns (..., N) in x's dtype.
    K must be a multiple of the blocksize (so that no block straddles two rows). `block_k`, `rows`
    and `unroll` default to BLOCK_K, ROWS and UNROLL (read at each call), num_warps to block_k // 256.
    """
    w = nf4_weight(packed, quant_state)
    if len(w.shape) != 2:
        raise ValueError(f"the weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    n_out, k_in = w.shape
    if k_in % w.blocksize:
        raise ValueError(f"in_features ({k_in}) must be a multiple of blocksize ({w.blocksize}): a block would "
                         f"straddle two rows (use dequantize_4bit + matmul for such weights)")
    if not isinstance(x, Tensor) or x.dtype not in DTYPES:
        raise TypeError(f"x must be a bfloat16, float16 or float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.shape[-1] != k_in:
        raise ValueError(f"x must have in_features = {k_in} values in its last dim, got shape {tuple(x.shape)}")
    block_k = BLOCK_K if block_k is None else block_k
    rows_per_program = ROWS if rows is None else rows
    unroll = UNROLL if unroll is None else unroll
    _power_of_two("block_k", block_k, 16, 16384)
    _power_of_two("rows", rows_per_program, 1, 1024)
    _power_of_two("unroll", unroll, 1, 16)
    num_warps = max(1, min(32, block_k // 256)) if num_warps is None else num_warps
    _power_of_two("num_warps", num_warps, 1, 32)
    device = check_device(x=x, **w.tensors())
    xs = x.reshape(-1, k_in).contiguous()                                # (M, K)
    y = torch.empty(xs.shape[0], n_out, dtype=x.dtype, device=device)    # (M, N)
    unused = w.absmax  # any pointer: the kernel reads absmax2/code2/offset only when NESTED
    _gemv_kernel[(xs.shape[0] * triton.cdiv(n_out, rows_per_program),)](
        xs, w.packed, w.absmax, w.code, y, w.absmax2 if w.nested else unused, w.code2 if w.nested else unused,
        w.offset if w.nested else unused, n_out, xs.shape[0], K=k_in, BLOCKSIZE=w.blocksize,
        BLOCKSIZE2=w.blocksize2, NESTED=w.nested, BLOCK_K=block_k, ROWS=rows_per_program, UNROLL=unroll,
        num_warps=num_warps)
    return y.reshape(*x.shape[:-1], n_out)


def tolerance(w: Tensor, x: Tensor, y: Tensor, y_ref: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The elementwise bound of the module docstring on |y - y_ref| (float64), for y = gemv_4bit(x, ...)
    and y_ref = x @ dequantize(W).T, both in `dtype` (default y's); `w` is W in float32 (N, K), x (..., K)."""
    u = UNIT_ROUNDOFF[dtype or y.dtype]
    k = w.shape[1]
    abs_products = x.abs().double() @ w.abs().double().T                 # sum_k |w_k| |x_k|, (..., N)
    return u * (y.abs().double() + y_ref.abs().double()) + (u + 2 * k * 2.0**-24) * abs_products
