"""Checkers of notebook 10 (GPU lab)."""

from __future__ import annotations

from . import exercise


def logits_bytes(fn):
    """Exercise 10.1: bytes of one float32 logits tensor (batch, seq, vocab)."""
    with exercise("10.1", "logits bytes") as ex:
        ex.equal(fn(4, 512, 128256), 4 * 512 * 128256 * 4, "logits_bytes(4, 512, 128256)",
                 hint="every position of every sequence holds one float32 (4 bytes) per vocabulary entry")
        ex.equal(fn(1, 1, 10), 40, "logits_bytes(1, 1, 10)", hint="float32 is 4 bytes, not 2")
    return ex.result
