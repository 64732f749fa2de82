"""Checkers for notebook 09 (the format landscape, GGUF, the memory calculator).

9.1 bits_per_weight(fn):    fn(code_bits, block_size, metadata_bits) -> float, storage bits per weight
9.2 q4_0_block(fn):         fn(x: 32 float32 values) -> (d, codes), llama.cpp's Q4_0 block unpacked
9.3 weight_bytes(fn):       fn(shape: qlearn.memory.Shape, bits_per_weight) -> bytes of a Llama's weights
9.4 adamw_state_bytes(fn):  fn(n_params, state_bits, blocksize=256) -> bytes of AdamW's two states
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import memory
from . import CheckResult, exercise

__all__ = ["adamw_state_bytes", "bits_per_weight", "q4_0_block", "weight_bytes"]

# (code bits, values per block, metadata bits per block, expected, the format)
_BLOCK_CASES = [
    (8, 32, 16, 8.5, "Q8_0: an fp16 scale per 32 int8 codes"),
    (4, 32, 16, 4.5, "Q4_0: an fp16 scale per 32 4-bit codes"),
    (4, 32, 32, 5.0, "Q4_1: an fp16 scale and an fp16 minimum"),
    (4, 64, 32, 4.5, "NF4: an fp32 absmax per 64"),
    (4, 64, 8 + 32 / 256, 4 + 8 / 64 + 32 / (64 * 256), "NF4 + double quantization"),
    (4, 256, 8 * 12 + 32, 4.5, "Q4_K: 8 sub-blocks with a 6-bit scale and min, fp16 d and dmin"),
    (6, 256, 16 * 8 + 16, 6.5625, "Q6_K: 16 int8 scales and an fp16 d"),
]


def bits_per_weight(fn) -> CheckResult:
    """Exercise 9.1: a block format's bits per weight = code bits + metadata bits / block size."""
    with exercise("9.1", "bits per weight of a block format") as ex:
        for code_bits, block, meta, expected, name in _BLOCK_CASES:
            got = fn(code_bits, block, meta)
            ex.close(got, expected, what=f"bits_per_weight({code_bits}, {block}, {meta:g}) for {name}",
                     atol=1e-9, rtol=0.0,
                     hint="the block's metadata (scales, minimums) is shared by its block_size weights: "
                          "add metadata_bits / block_size to the code bits")
    return ex.result


def _gguf_q4_0(x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(stored fp16 scale, the 32 codes) of one block as gguf's quantizer writes it."""
    import gguf

    raw = gguf.quants.quantize(x.numpy().reshape(1, 32), gguf.GGMLQuantizationType.Q4_0).reshape(-1)
    d = float(raw[:2].view(np.float16)[0])
    packed = torch.from_numpy(raw[2:].astype(np.int64))
    return d, torch.cat([packed & 0xF, packed >> 4])


def _q4_0_cases() -> list[torch.Tensor]:
    ramp = (torch.tensor(list(range(16)) + list(range(15, -1, -1))) - 8).float()  # d = 1, codes 0..15
    g = torch.Generator().manual_seed(8)
    rand = torch.randn(32, generator=g) * 0.02
    positive_max = rand.clone()
    positive_max[3] = 0.1  # M > 0: d < 0
    tie = rand.clone()
    tie[5], tie[9] = -0.1, 0.1  # |M| twice: the first sets d; the other is -M and clips from 16 to 15
    return [ramp, rand, positive_max, tie]


def q4_0_block(fn) -> CheckResult:
    """Exercise 9.2: d = M / -8 (M: the largest magnitude, sign kept), q = min(15, trunc(x/d + 8.5))."""
    with exercise("9.2", "one Q4_0 block") as ex:
        for i, x in enumerate(_q4_0_cases()):
            got = fn(x.clone())
            ex.true(isinstance(got, tuple) and len(got) == 2, f"return (d, codes), got {type(got).__name__}")
            d, codes = got
            d_ref, codes_ref = _gguf_q4_0(x)
            ex.close(float(d), d_ref, what=f"d of block {i}", atol=0.0, rtol=2**-10,  # fp16 storage of d
                     hint="d = M / -8 where M is the value of largest magnitude WITH its sign (not absmax)")
            codes = torch.as_tensor(codes).reshape(-1).to(torch.int64)
            ex.equal(codes, codes_ref, what=f"codes of block {i}",
                     hint="q = trunc(x / d + 8.5), then clip to 0..15 (the value -M lands on 16); "
                          "trunc, not round: 8.5 = the offset 8 plus 0.5 for rounding")
    return ex.result


def weight_bytes(fn) -> CheckResult:
    """Exercise 9.3: block linear layers at `bits_per_weight`, embeddings, head and norms in 16-bit."""
    with exercise("9.3", "bytes of a model's weights") as ex:
        for name, bpw in (("llama-13b", 4.5), ("llama-7b", 8.5), ("tiny", 4.5)):
            shape = memory.shape_of(name)
            expected = shape.linear_params * bpw / 8 + (shape.params - shape.linear_params) * 2
            got = fn(shape, bpw)
            ex.close(got, expected, what=f"weight_bytes({name}, {bpw})", atol=1.0, rtol=0.0,
                     hint="only the block linear layers (shape.linear_params) are quantized; the "
                          "embedding, head and norms (shape.params - shape.linear_params) stay 16-bit, "
                          "2 bytes each; bits / 8 = bytes")
    return ex.result


def adamw_state_bytes(fn) -> CheckResult:
    """Exercise 9.4: two states per parameter; 8-bit states add an fp32 absmax per block."""
    cases = [(1000, 32, 8000), (10**6, 16, 4 * 10**6), (10**6, 8, 2 * (10**6 + 4 * math.ceil(10**6 / 256))),
             (100, 8, 2 * (100 + 4))]
    with exercise("9.4", "AdamW state bytes") as ex:
        for n, bits, expected in cases:
            got = fn(n, bits)
            hint = ("AdamW keeps two states per parameter (m and v), each bits / 8 bytes"
                    if bits != 8 else "8-bit states: 1 byte per value per state, plus one fp32 absmax "
                    "(4 bytes) per block of 256 values, rounded up (ceil), for each of the two states")
            ex.close(got, expected, what=f"adamw_state_bytes({n}, {bits})", atol=0.0, rtol=0.0, hint=hint)
    return ex.result
