"""FP8 scaled matmuls, the three training recipes, emulated from scratch on the CPU.

An FP8 tensor is E4M3 (or E5M2) codes plus float32 scales, one per block of the tensor viewed as 2-D
(rows, K) (leading dimensions flattened into rows). For each block B (torchao.float8's rule):

    s_B  = fmax / max(amax_B, 1e-12)                   float64 division, then float32 (amax_to_scale)
    q_i  = round_fp8(clamp(x_i · s_B, -fmax, fmax))    saturating, to nearest even (floats.round_to)
    x̂_i  = q_i / s_B

A scaled matmul multiplies the codes and applies the inverse scales. With a = activations (M, K) and
b = weights (N, K), y = a b^T as nn.Linear computes it:

    tensorwise, rowwise   y_mn = (Σ_k qa_mk qb_nk) · (1/sa_m) · (1/sb_n)
    blockwise             y_mn = Σ_kb (Σ_{k in kb} qa_mk qb_nk) · (1/sa_m,kb) · (1/sb_nb,kb)

The recipes (RECIPES: the block of a, the block of b; rows x columns of the 2-D view):
    tensorwise   (M, K) and (N, K): one scale each      torchao.float8 "tensorwise"; torch._scaled_mm TensorWise
    rowwise      (1, K) and (1, K): a scale per token    torchao.float8 "rowwise" (scales rounded down to a power
                 and per output channel                  of two); torch._scaled_mm RowWise
    blockwise    (1, 128) and (128, 128)                 DeepSeek-V3 (Sec. 3.3): activation tiles, weight blocks
Blockwise scales change along K, so the sum is cut every 128 values: DeepSeek-V3 does the same on H800s, whose
FP8 tensor cores keep about 14 bits of the running sum, by adding each 128-long partial sum in float32.

The sums here are exact for E4M3: an E4M3 value is an integer multiple of 2^-9 below 2^9, so a product of two
is a multiple of 2^-18 below 2^18, and float64 adds up to 2^17 of them without rounding, in any order. So an
emulated E4M3 product is the same bits on every CPU; torch._scaled_mm accumulates in float32 (tests compare).

E4M3 for the forward pass, E5M2 for gradients (`range_vs_precision`): E4M3 has 3 mantissa bits and
spans 2^-9 .. 448 (17.8 binades); E5M2 has 2 mantissa bits and spans 2^-16 .. 57344 (31.8 binades).
Activations and weights need precision; gradients spread over many binades and need range, so
under one tensor scale E4M3 flushes their small entries to zero. With finer scales the range comes from
the scales: torchao's rowwise recipe and DeepSeek-V3 use E4M3 for gradients too.
Hardware: FP8 matmuls need compute capability >= 8.9 (Ada, Hopper; torch._scaled_mm on CUDA); blockwise
scaling needs cuBLAS's block-scaled FP8 GEMM (Hopper, recent CUDA) or DeepGEMM-style kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..quant.state import QuantState, storage_bits
from .floats import _pow2, encode, info
from .mx import decode_codes

__all__ = ["EPS", "FP8_FORMATS", "RECIPES", "FP8State", "RangePrecision", "fp8_matmul", "quantize_fp8",
           "range_vs_precision", "relative_error", "scaled_mm", "torch_scaled_mm"]

FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")
EPS = 1e-12  # torchao.float8's floor under amax: an all-zero block gets a finite scale
# recipe: (block of a, block of b, scales rounded down to a power of two); None = the whole 2-D view
RECIPES = {"tensorwise": (None, None, False), "rowwise": ("row", "row", True), "blockwise": ((1, 128), (128, 128), False)}


def _as_2d(x: Tensor) -> Tensor:
    return x.detach().reshape(-1, x.shape[-1]) if x.dim() > 1 else x.detach().reshape(1, -1)  # (rows, K)


def _resolve_block(block_size, rows: int, k: int) -> tuple[int, int]:
    if block_size is None:
        return rows, k
    if block_size == "row":
        return 1, k
    if (not isinstance(block_size, tuple) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size)):
        raise ValueError(f"block_size must be None (per tensor), 'row' or a (rows, columns) tuple of positive ints, "
                         f"got {block_size!r}")
    if rows % block_size[0] or k % block_size[1]:
        raise ValueError(f"block_size {block_size} must divide the 2-D view of x, (rows, K) = ({rows}, {k})")
    return block_size


def _check_x(x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() == 0:
        raise TypeError(f"x must be a floating-point tensor with at least one dimension, got {x.dtype}, "
                        f"shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf: its amax, and so every scale, would be NaN or inf")


@dataclass(repr=False)
class FP8State(QuantState):
    """FP8 codes (uint8 bit patterns of `fmt`, the input's shape) and float32 scales `scale` (torchao's s: the
    multiplier into FP8 range), one per block of `block` (rows, columns) of the 2-D view (rows, K)."""

    codes: Tensor
    scale: Tensor        # float32, (rows / block[0], K / block[1])
    fmt: str
    block: tuple[int, int]
    shape: torch.Size
    dtype: torch.dtype
    power_of_2: bool = False

    @property
    def bits(self) -> float:
        return 8

    @property
    def granularity(self) -> str:
        rows, k = math.prod(self.shape[:-1]), self.shape[-1]
        kind = ("tensorwise" if self.block == (rows, k) else "rowwise" if self.block == (1, k)
                else f"blocks of {self.block[0]}x{self.block[1]}")
        return f"{kind}, fp32 scales{' (powers of two)' if self.power_of_2 else ''}"

    def codes_2d(self) -> Tensor:
        """The FP8 values (float32, exact) as the 2-D view (rows, K)."""
        return decode_codes(_as_2d(self.codes), self.fmt)

    def inverse_scale(self) -> Tensor:
        """1 / s per element of the 2-D view (float32): what torch._scaled_mm takes as scale_a / scale_b."""
        return (1.0 / self.scale).repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)

    def _values(self) -> Tensor:
        s = self.scale.repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)
        return (self.codes_2d() / s).reshape(self.shape)  # x̂ = q / s, as torchao's to_original_precision

    def storage_bits(self) -> float:
        return storage_bits(self.numel, 8, scales=self.scale.numel(), scale_bits=32)

    def _repr_fields(self) -> str:
        return f"fmt={self.fmt!r}"


def quantize_fp8(x: Tensor, fmt: str = "fp8_e4m3", block_size: tuple[int, int] | str | None = None, *,
                 power_of_2: bool = False) -> FP8State:
    """FP8-quantize x with one float32 scale per block of its 2-D view (rows, K) (module docstring):
    s = fmax / max(amax, 1e-12), q = round_fp8(clamp(x s, -fmax, fmax)). block_size None: per tensor; "row":
    per row; (r, c): blocks of r rows x c columns ((1, 128): DeepSeek's activation tiles; (128, 128): its
    weight blocks). power_of_2: round s down to a power of two (torchao's rowwise recipe)."""
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fmt must be one of {FP8_FORMATS}, got {fmt!r}")
    _check_x(x)
    x2 = _as_2d(x).float()  # (rows, K)
    r, c = _resolve_block(block_size, *x2.shape)
    tiles = x2.reshape(x2.shape[0] // r, r, x2.shape[1] // c, c)  # (rows/r, r, K/c, c)
    # Step 1: the scale of each block, in float64 then float32 (as torchao's amax_to_scale).
    amax = tiles.abs().amax(dim=(1, 3)).double()  # (rows/r, K/c)
    fmax = info(fmt).max
    s = (fmax / amax.clamp(min=EPS)).float()
    if power_of_2:  # 2^floor(log2 s), from s's exponent field (exact)
        s = _pow2(((s.view(torch.int32) >> 23) & 0xFF) - 127).float()
    # Step 2: scale, saturate and round each value (float32 product, as torchao's x.to(float32) * s).
    y = (tiles * s[:, None, :, None]).clamp(-fmax, fmax)
    codes = encode(y, fmt).to(torch.uint8).reshape(x.shape)
    return FP8State(codes, s, fmt, (r, c), x.shape, x.dtype, power_of_2)


def scaled_mm(a: FP8State, b: FP8State, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """y = a b^T from FP8 states (a: (..., K) activations, b: (N, K) weights), the codes multiplied and the
    inverse scales applied per K-block (module docstring): float64 sums (exact for E4M3), the scales applied
    with one float64 rounding per K-block, the result rounded to out_dtype."""
    if not isinstance(a, FP8State) or not isinstance(b, FP8State):
        raise TypeError("a and b must be FP8State objects from quantize_fp8")
    if a.shape[-1] != b.shape[-1] or len(b.shape) != 2:
        raise ValueError(f"b must be (N, K) with a's K: got a {tuple(a.shape)}, b {tuple(b.shape)}")
    qa, qb = a.codes_2d().double(), b.codes_2d().double()  # (M, K), (N, K)
    ia, ib = a.inverse_scale().double(), b.inverse_scale().double()  # the same shapes
    k = qa.shape[1]
    step = min(a.block[1], b.block[1])  # where the scales along K change (K itself for tensor/rowwise)
    if a.block[1] % step or b.block[1] % step:
        raise ValueError(f"a's and b's blocks along K ({a.block[1]}, {b.block[1]}) must nest")
    y = torch.zeros(qa.shape[0], qb.shape[0], dtype=torch.float64, device=qa.device)
    for k0 in range(0, k, step):  # one K-block at a time: its partial sum, times its scales
        kb = slice(k0, k0 + step)
        scales = ia[:, k0:k0 + 1] * ib[:, k0:k0 + 1].T  # (M, N): exact, two 24-bit significands
        y += (qa[:, kb] @ qb[:, kb].T) * scales
    return y.to(out_dtype).reshape(*a.shape[:-1], qb.shape[0])


def fp8_matmul(x: Tensor, w: Tensor, recipe: str = "tensorwise", fmt: str = "fp8_e4m3",
               out_dtype: torch.dtype = torch.float32) -> Tensor:
    """x w^T (as F.linear) with x and w quantized to `fmt` by `recipe` (RECIPES) and multiplied by `scaled_mm`."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
    block_a, block_b, pow2 = RECIPES[recipe]
    return scaled_mm(quantize_fp8(x, fmt, block_a, power_of_2=pow2), quantize_fp8(w, fmt, block_b, power_of_2=pow2),
                     out_dtype)


def relative_error(y: Tensor, ref: Tensor) -> float:
    """||y - ref|| / ||ref|| (Frobenius norms, in float64)."""
    return float(torch.linalg.vector_norm(y.double() - ref.double()) / torch.linalg.vector_norm(ref.double()))


@dataclass(frozen=True)
class RangePrecision:
    """One FP8 format on one tensor, under one tensor scale."""

    fmt: str
    binades: float        # log2(max / smallest subnormal): the range the format spans
    flushed: float        # share of the nonzero inputs that came back as zero (underflow)
    rel_error: float      # ||x̂ - x|| / ||x||: dominated by the large values, where precision counts


def range_vs_precision(x: Tensor, fmts: tuple[str, ...] = FP8_FORMATS) -> dict[str, RangePrecision]:
    """Why E5M2 for gradients: quantize x with one tensor scale in each format and report its range, the share of
    nonzero values flushed to zero, and the relative error (E4M3 is more precise, E5M2 loses fewer small values)."""
    out = {}
    nonzero = x != 0
    for fmt in fmts:
        q = quantize_fp8(x, fmt).dequantize(torch.float32)
        i = info(fmt)
        flushed = float((q[nonzero] == 0).float().mean()) if nonzero.any() else 0.0
        out[fmt] = RangePrecision(fmt, math.log2(i.max / i.smallest_subnormal), flushed, relative_error(q, x))
    return out


def torch_scaled_mm(a: FP8State, b: FP8State, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """The same product by torch._scaled_mm (tensorwise or rowwise states; CPU in torch 2.13, CUDA capability
    >= 8.9): the codes as float8 tensors, b column-major, the inverse scales as scale_a (M, 1) / scale_b (1, N)."""
    dtypes = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
    qa = _as_2d(a.codes).view(dtypes[a.fmt])
    qb = b.codes.view(dtypes[b.fmt]).t()  # (K, N), column-major as _scaled_mm needs
    rows_a, rows_b = qa.shape[0], b.shape[0]
    if a.block == (rows_a, a.shape[-1]) and b.block == tuple(b.shape):
        sa, sb = (1.0 / a.scale).reshape(()), (1.0 / b.scale).reshape(())
    elif a.block == (1, a.shape[-1]) and b.block == (1, b.shape[-1]):
        sa, sb = 1.0 / a.scale, (1.0 / b.scale).reshape(1, rows_b)  # (M, 1), (1, N)
    else:
        raise ValueError("torch._scaled_mm takes tensorwise or rowwise scales here (blockwise needs CUDA's "
                         "torch.nn.functional.scaled_mm with ScalingType.BlockWise1x128 / BlockWise128x128)")
    y = torch._scaled_mm(qa, qb, scale_a=sa.contiguous(), scale_b=sb.contiguous(), out_dtype=out_dtype)
    return y.reshape(*a.shape[:-1], rows_b)
