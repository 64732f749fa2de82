"""Checkers of notebook 10 (GPU lab).

10.1 logits_bytes(fn):          fn(batch, seq, vocab) -> bytes of one float32 logits tensor
10.2 arithmetic_intensity(fn):  fn(batch, n_out, k_in, weight_bits) -> FLOP per byte of y = x W^T
"""

from __future__ import annotations

from . import exercise

__all__ = ["arithmetic_intensity", "logits_bytes"]


def logits_bytes(fn):
    """Exercise 10.1: bytes of one float32 logits tensor (batch, seq, vocab)."""
    with exercise("10.1", "logits bytes") as ex:
        ex.equal(fn(4, 512, 128256), 4 * 512 * 128256 * 4, "logits_bytes(4, 512, 128256)",
                 hint="every position of every sequence holds one float32 (4 bytes) per vocabulary entry")
        ex.equal(fn(1, 1, 10), 40, "logits_bytes(1, 1, 10)", hint="float32 is 4 bytes, not 2")
    return ex.result


def _intensity(batch: int, n_out: int, k_in: int, weight_bits: float) -> float:
    """2 B N K / (N K weight_bits / 8 + 2 B (K + N)): FLOPs over the bytes moved at least once."""
    return 2 * batch * n_out * k_in / (n_out * k_in * weight_bits / 8 + 2 * batch * (k_in + n_out))


def arithmetic_intensity(fn):
    """Exercise 10.2: FLOP/byte of a linear layer with B rows of bf16 input, weight_bits per weight."""
    cases = [(1, 8192, 8192, 16), (1, 8192, 8192, 4.127), (64, 4096, 14336, 16), (4096, 8192, 8192, 16),
             (4096, 8192, 8192, 4.127)]
    with exercise("10.2", "arithmetic intensity of a linear layer") as ex:
        for b, n, k, bits in cases:
            got, want = fn(b, n, k, bits), _intensity(b, n, k, bits)
            what = f"arithmetic_intensity({b}, {n}, {k}, {bits})"
            if not isinstance(got, (int, float)):
                hint = "return a number (FLOP per byte), e.g. a float"
            elif abs(got - want / 2) <= 1e-6 * want:
                hint = "a multiply-add is 2 floating-point operations: F = 2 B N K"
            elif abs(got - 2 * b * n * k / (n * k * bits / 8)) <= 1e-6 * want:
                hint = "count the activations too: x (B x K) is read and y (B x N) written, 2 bytes per value in bf16"
            elif abs(got - 2 * b * n * k / (n * k * bits + 2 * b * (k + n))) <= 1e-6 * want:
                hint = "weight_bits / 8 bytes per weight: a 4-bit weight is half a byte"
            else:
                hint = "F / bytes with F = 2 B N K and bytes = N K weight_bits / 8 + 2 B (K + N)"
            # rtol: the same integers and one float (weight_bits) in any order agree to ~1e-15
            ex.close(got, want, what=what, atol=0.0, rtol=1e-9, hint=hint)
    return ex.result
