"""The notebook 11 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted."""

import math

import torch

from qlearn.check import nb11


def shard_rows(rows, n):
    c = -(-rows // n)
    return [max(0, min(c, rows - r * c)) for r in range(n)]


def shard_rows_floor(rows, n):  # the usual mistake: drops the remainder
    return [rows // n] * n


def shard_rows_balanced(rows, n):  # numpy.array_split's split, not torch.chunk's
    return [rows // n + (r < rows % n) for r in range(n)]


def bf16_nan_count(raw):
    bits = raw[0::2].to(torch.int32) | (raw[1::2].to(torch.int32) << 8)
    return int((((bits >> 7) & 0xFF) == 0xFF).logical_and((bits & 0x7F) != 0).sum())


def bf16_nan_count_with_infs(raw):  # the usual mistake: the exponent alone
    bits = raw[0::2].to(torch.int32) | (raw[1::2].to(torch.int32) << 8)
    return int((((bits >> 7) & 0xFF) == 0xFF).sum())


def bf16_nan_count_big_endian(raw):
    bits = (raw[0::2].to(torch.int32) << 8) | raw[1::2].to(torch.int32)
    return int((((bits >> 7) & 0xFF) == 0xFF).logical_and((bits & 0x7F) != 0).sum())


def replicated_fraction(total, packed, n):
    return ((total - packed) / n + packed) / total


def replicated_fraction_sharded(total, packed, n):  # forgets the replication
    return 1 / n


def replicated_fraction_double_counted(total, packed, n):  # shards everything and adds the packed bytes again
    return (total / n + packed) / total


def test_shard_rows_checker(check_exercise):
    check_exercise(nb11.shard_rows, shard_rows, shard_rows_floor, "drops the remainder")
    result = nb11.shard_rows(shard_rows_balanced)
    assert result.status == "FAILED" and "not array_split" in result.message


def test_shard_rows_matches_fsdp2s_split():
    from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty

    for rows, n in ((5, 4), (3, 8), (768, 2)):
        assert shard_rows(rows, n) == [c.shape[0] for c in _chunk_with_empty(torch.empty(rows, 1), n, dim=0)]


def test_bf16_nan_count_checker(check_exercise):
    check_exercise(nb11.bf16_nan_count, bf16_nan_count, bf16_nan_count_with_infs, "infinity, not NaN")
    result = nb11.bf16_nan_count(bf16_nan_count_big_endian)
    assert result.status == "FAILED" and "little-endian" in result.message


def test_replicated_fraction_checker(check_exercise):
    check_exercise(nb11.replicated_fraction, replicated_fraction, replicated_fraction_sharded, "every rank keeps all")
    result = nb11.replicated_fraction(replicated_fraction_double_counted)
    assert result.status == "FAILED" and "add the packed bytes once" in result.message
    # the tiny model's QLoRA run on 2 ranks: 56.3% each (qlearn.fsdp's docstring)
    assert round(replicated_fraction(20_329_472, 2_555_904, 2), 3) == 0.563
    assert math.isclose(replicated_fraction(100, 0, 4), 0.25)
