"""Packing low-bit codes into bytes: what makes a 4-bit model take half the memory of an 8-bit one.

Codes are unsigned integers in [0, 2^bits) (shift signed codes by 2^(bits-1) first).
    4 bits: 2 codes per byte, the first code in the HIGH nibble: byte = (c0 << 4) | c1.
    2 bits: 4 codes per byte, the first code in the highest two bits: (c0 << 6) | (c1 << 4) | (c2 << 2) | c3.
    3 bits: 8 codes in 3 bytes: the 24-bit number c0 c1 ... c7 (c0 most significant), big-endian.
A tail that does not fill a byte (or 3 bytes) is padded with zero codes; `unpack` needs `numel`
to drop them again.

The 4-bit order is bitsandbytes'. Its pure-PyTorch 4-bit kernel (bitsandbytes 0.50.2,
bitsandbytes/backends/default/ops.py, `quantize_4bit`) packs the flattened codes as
`(q8[::2] << 4) | q8[1::2]`, the even-indexed (first) code in the high nibble, and its
`dequantize_4bit` reads them back with `out[::2] = A >> 4; out[1::2] = A & 0xF`; tests/test_packing.py
checks `pack` against `bitsandbytes.functional.quantize_4bit` byte for byte. Other formats choose
differently: GGUF's Q4_0 puts value j of a 32-block in the LOW nibble of byte j and value j + 16 in its
high nibble (qlearn.gguf_export), so always read a format's packing before reinterpreting its bytes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BITS", "pack", "packed_nbytes", "unpack"]

BITS = (2, 3, 4)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take once packed."""
    _check_bits(bits)
    return 3 * math.ceil(numel / 8) if bits == 3 else math.ceil(numel * bits / 8)


def pack(q: Tensor, bits: int) -> Tensor:
    """Flatten the codes `q` (integers in [0, 2^bits)) and pack them into a 1-D uint8 tensor."""
    _check_bits(bits)
    if not isinstance(q, Tensor) or q.is_floating_point() or q.is_complex():
        raise TypeError(f"q must be an integer torch.Tensor of codes, got {getattr(q, 'dtype', type(q))}")
    flat = q.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must be in [0, {2**bits - 1}] for bits={bits}, got values in "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    per = 8 if bits == 3 else 8 // bits  # codes per packing unit (3 bytes for 3-bit, 1 byte otherwise)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % per)).view(-1, per)  # (units, per)
    shifts = torch.arange(per - 1, -1, -1, dtype=torch.int32) * bits  # first code in the highest bits
    words = (flat << shifts).sum(dim=1)  # (units,): one integer of per * bits bits
    if bits != 3:
        return words.to(torch.uint8)
    byte_shifts = torch.tensor([16, 8, 0], dtype=torch.int32)
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)  # big-endian


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The first `numel` codes of `packed` (from `pack`), as a 1-D uint8 tensor."""
    _check_bits(bits)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 torch.Tensor, got {getattr(packed, 'dtype', type(packed))}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0 or packed_nbytes(numel, bits) > packed.numel():
        raise ValueError(f"numel must be an int in [0, {packed.numel() * 8 // bits}] for {packed.numel()} "
                         f"bytes of {bits}-bit codes, got {numel!r}")
    per = 8 if bits == 3 else 8 // bits
    b = packed.reshape(-1).to(torch.int32)
    words = (b.view(-1, 3) * torch.tensor([1 << 16, 1 << 8, 1], dtype=torch.int32)).sum(1) if bits == 3 else b
    shifts = torch.arange(per - 1, -1, -1, dtype=torch.int32) * bits
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)  # (units, per)
    return codes.reshape(-1)[:numel].to(torch.uint8)
