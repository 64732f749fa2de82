"""bitsandbytes' packed NF4 bytes and QuantState, checked once, as the kernels read them.

bitsandbytes stores a weight W of n values (row-major) as:

    packed      uint8, (n + 1) // 2 bytes: value 2i in the HIGH nibble of byte i, value 2i + 1 in the low one
    absmax      float32, one per block of `blocksize` values                        (plain)
             or uint8 codes of the absmax values, and quant_state.state2 with        (double-quantized)
                absmax2 (float32, one per `state2.blocksize` = 256 blocks), code2 (the 256-value
                dynamic map) and quant_state.offset (the mean that was subtracted):
                absmax_b = code2[absmax[b]] * absmax2[b // 256] + offset
    code        float32 (16,): the NF4 table, quant_state.code
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["BLOCKSIZES", "DTYPES", "NF4Weight", "nf4_weight"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes' dequantize_4bit takes
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class NF4Weight(NamedTuple):
    packed: Tensor            # uint8 (ceil(n/2),), flat
    absmax: Tensor            # float32 (n_blocks,), or uint8 (n_blocks,) when nested
    code: Tensor              # float32 (16,)
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype        # the dtype the weight had; dequantize's default output dtype
    absmax2: Tensor | None    # float32 (ceil(n_blocks / blocksize2),) when nested
    code2: Tensor | None      # float32 (256,) when nested
    offset: Tensor | None     # float32 (1,) when nested
    blocksize2: int           # 256 in bitsandbytes (unused when not nested)

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def tensors(self) -> dict[str, Tensor]:
        names = ("packed", "absmax", "code") + (("absmax2", "code2", "offset") if self.nested else ())
        return {name: getattr(self, name) for name in names}


def _need(t, name: str, dtype: torch.dtype, numel: int, hint: str = "") -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}{hint}")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} values, expected {numel}: does it belong to this weight?")
    return t.reshape(-1).contiguous()  # a view for bitsandbytes' (already contiguous) tensors


def nf4_weight(packed: Tensor, quant_state=None) -> NF4Weight:
    """Check bitsandbytes' `packed` bytes and `quant_state` (from `quantize_4bit`, or a Linear4bit's
    `weight.quant_state`; taken from `packed.quant_state` when None) and return them flat."""
    if quant_state is None:
        quant_state = getattr(packed, "quant_state", None)
    if quant_state is None or not hasattr(quant_state, "absmax") or not hasattr(quant_state, "quant_type"):
        raise TypeError("quant_state must be bitsandbytes' QuantState (from bitsandbytes.functional.quantize_4bit, "
                        f"or a Linear4bit's weight.quant_state), got {type(quant_state).__name__}")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("this weight was repacked by bitsandbytes' CPU inference path (an eval-mode forward on an "
                         "AVX-512 CPU) into another layout: reload it and call qlearn.models.keep_standard_layout first")
    if quant_state.quant_type != "nf4":
        raise ValueError(f"quant_type must be 'nf4' (these kernels hold the NF4 table), got {quant_state.quant_type!r}")
    if quant_state.blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' sizes), got {quant_state.blocksize!r}")
    if quant_state.dtype not in DTYPES:
        raise ValueError(f"quant_state.dtype must be one of {DTYPES}, got {quant_state.dtype}")
    shape = torch.Size(quant_state.shape)
    n = math.prod(shape)
    n_blocks = math.ceil(n / quant_state.blocksize)
    packed = _need(getattr(packed, "data", packed), "packed", torch.uint8, (n + 1) // 2,
                   " (a Linear4bit with quant_storage=bfloat16 holds the same bytes: pass weight.view(torch.uint8))")
    code = _need(quant_state.code, "quant_state.code", torch.float32, 16)
    if quant_state.nested:
        s2 = quant_state.state2
        absmax = _need(quant_state.absmax, "quant_state.absmax", torch.uint8, n_blocks,
                       " (double-quantized absmax values are 8-bit codes)")
        absmax2 = _need(s2.absmax, "quant_state.state2.absmax", torch.float32, math.ceil(n_blocks / s2.blocksize))
        code2 = _need(s2.code, "quant_state.state2.code", torch.float32, 256)
        offset = _need(quant_state.offset, "quant_state.offset", torch.float32, 1)
        return NF4Weight(packed, absmax, code, quant_state.blocksize, shape, quant_state.dtype,
                         absmax2, code2, offset, s2.blocksize)
    absmax = _need(quant_state.absmax, "quant_state.absmax", torch.float32, n_blocks)
    return NF4Weight(packed, absmax, code, quant_state.blocksize, shape, quant_state.dtype, None, None, None, 256)
