"""Checkers of notebook 11 (beyond one GPU: FSDP-QLoRA). Tests: tests/test_check_nb11.py.

    11.1 shard_rows(rows, n)                      rows of a parameter each of n ranks holds (FSDP2's split:
                                                  torch.chunk along dim 0, ceil(rows / n) per rank, the last
                                                  ranks fewer, possibly none)
    11.2 bf16_nan_count(raw)                      elements of raw bytes (uint8, little-endian pairs) that
                                                  are bf16 NaN bit patterns: exponent 0xFF, mantissa != 0
    11.3 replicated_fraction(total, packed, n)    the share of all parameter bytes each rank holds when the
                                                  packed 4-bit weights stay whole on every rank (uint8
                                                  storage, accelerate#3983): ((total - packed) / n + packed) / total
"""

from __future__ import annotations

import math

import torch

from . import exercise

__all__ = ["bf16_nan_count", "replicated_fraction", "shard_rows"]


def _chunk_rows(rows: int, n: int) -> list[int]:
    """torch.chunk's rows per rank, padded with empty shards to n ranks (what FSDP2 does)."""
    sizes = [c.shape[0] for c in torch.empty(rows, 0).chunk(n, dim=0)]
    return sizes + [0] * (n - len(sizes))


def shard_rows(fn):
    """Exercise 11.1: the rows of a (rows, cols) parameter each of n ranks holds under full sharding."""
    with exercise("11.1", "shard rows") as ex:
        for rows, n in ((768, 2), (256, 4), (10, 4), (5, 4), (3, 8)):
            got = fn(rows, n)
            expected = _chunk_rows(rows, n)
            if isinstance(got, tuple):
                got = list(got)
            ex.true(isinstance(got, list) and len(got) == n, f"shard_rows({rows}, {n}) should return a list of {n} "
                    f"row counts, one per rank; got {got!r}", hint="one entry per rank, even for ranks that get none")
            floor = [rows // n] * n
            balanced = [rows // n + (r < rows % n) for r in range(n)]  # numpy.array_split's split
            if got == floor != expected:
                ex.fail(f"shard_rows({rows}, {n}): expected {expected}, got {got}",
                        hint="rows // n drops the remainder: every row must live on some rank")
            if got == balanced != expected:
                ex.fail(f"shard_rows({rows}, {n}): expected {expected}, got {got}",
                        hint="FSDP2 splits like torch.chunk, not array_split: each rank takes c = ceil(rows / n) "
                             "rows (-(-rows // n)) until the rows run out, so the last ranks get fewer or none")
            ex.equal(got, expected, f"shard_rows({rows}, {n})",
                     hint="rank r holds rows r*c .. min((r+1)*c, rows) with c = ceil(rows / n), so late ranks may get 0")
    return ex.result


def _reference_nans(raw: torch.Tensor) -> int:
    return int(torch.isnan(raw.contiguous().view(torch.bfloat16)).sum())


def bf16_nan_count(fn):
    """Exercise 11.2: count the bf16 NaN bit patterns in raw little-endian bytes, without torch.isnan."""
    with exercise("11.2", "bf16 NaN patterns") as ex:
        # 1.0, +inf, -inf, the canonical NaN 0x7FC0, 0x7F81, -NaN 0xFF81, 0x7FFF, largest finite 0x7F7F
        values = [0x3F80, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFF81, 0x7FFF, 0x7F7F]
        raw = torch.tensor([b for v in values for b in (v & 0xFF, v >> 8)], dtype=torch.uint8)
        got = fn(raw)
        expected = _reference_nans(raw)  # 4
        infs = expected + 2
        if got == infs:
            ex.fail(f"bf16_nan_count on 8 patterns (1.0, +-inf, four NaNs, max finite): expected {expected}, got {got}",
                    hint="an exponent of all ones (0xFF) with a zero mantissa is +-infinity, not NaN: the mantissa "
                         "(low 7 bits) must be non-zero too")
        swapped = torch.tensor([b for v in values for b in (v >> 8, v & 0xFF)], dtype=torch.uint8)
        if got == _reference_nans(swapped) != expected:
            ex.fail(f"expected {expected}, got {got}", hint="the bytes are little-endian: element k is raw[2k] | raw[2k+1] << 8")
        ex.equal(got, expected, "bf16_nan_count(8 chosen patterns)",
                 hint="bf16 bits: sign (1), exponent (8), mantissa (7); NaN = exponent 0xFF and mantissa != 0")
        # every 16-bit pattern once: 2 signs x 127 non-zero mantissas = 254 NaNs
        every = torch.arange(65536, dtype=torch.int32)
        all_bytes = torch.stack([every & 0xFF, every >> 8], dim=1).flatten().to(torch.uint8)  # (131072,)
        ex.equal(fn(all_bytes), 254, "bf16_nan_count(all 65,536 patterns)",
                 hint="2 signs x 127 non-zero mantissas with the exponent 0xFF")
        g = torch.Generator().manual_seed(11)
        rand = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g)
        ex.equal(fn(rand), _reference_nans(rand), "bf16_nan_count(4096 random bytes)")
    return ex.result


def replicated_fraction(fn):
    """Exercise 11.3: the share of all parameter bytes one of n ranks holds when the packed weights stay whole."""
    with exercise("11.3", "replicated fraction") as ex:
        total, packed = 20_329_472, 2_555_904  # the tiny model's QLoRA run: all parameter bytes, packed NF4 bytes
        expected = ((total - packed) / 2 + packed) / total  # 0.5629
        got = fn(total, packed, 2)
        if isinstance(got, (int, float)) and math.isclose(got, 0.5, abs_tol=1e-9):
            ex.fail(f"replicated_fraction(tiny run, n=2): expected {expected:.4f}, got {got}",
                    hint="the packed 4-bit weights are not sharded (ignored_params): every rank keeps all of them")
        if isinstance(got, (int, float)) and math.isclose(got, (total / 2 + packed) / total, rel_tol=1e-9):
            ex.fail(f"replicated_fraction(tiny run, n=2): expected {expected:.4f}, got {got:.4f}",
                    hint="shard only what is not replicated: (total - packed) / n, then add the packed bytes once")
        # exact arithmetic on integers below 2^53: a double's rounding only, so 1e-12 relative
        ex.close(got, expected, "replicated_fraction(20329472, 2555904, 2)", atol=0, rtol=1e-12)
        ex.close(fn(100, 0, 4), 0.25, "replicated_fraction(100, 0, 4)", atol=0, rtol=1e-12,
                 hint="with nothing replicated each rank holds 1/n")
        ex.close(fn(100, 40, 1), 1.0, "replicated_fraction(100, 40, 1)", atol=0, rtol=1e-12,
                 hint="one rank holds everything")
    return ex.result
