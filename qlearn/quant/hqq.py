"""HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models"):
calibration-free optimization of the zero point of each group, robust to outlier weights.

With asymmetric quantization Q_z(W) = clamp(round(W / s + z), 0, 2^b - 1) and its inverse
Q_z^-1(W_q) = s (W_q - z), HQQ minimizes an l_p norm with p < 1 of the weight error,

    min_z  || W - Q_z^-1(Q_z(W)) ||_p^p            (p = 0.7: a few large errors cost little)

which is non-convex; half-quadratic splitting adds an extra variable W_e (the error) and alternates

    W_e <- shrink_p(W - Q_z^-1(Q_z(W)), beta)      shrink_p(x, beta) = sign(x) relu(|x| - |x|^(p-1) / beta)
    z   <- mean_group( Q_z(W) - (W - W_e) / s )     (the closed-form minimizer of the quadratic part)
    beta <- kappa * beta

starting from min-max RTN, with the scale s kept fixed (as HQQ's reference solver does) and the
zero point left in floating point (stored as fp16). HQQ's defaults: p = 0.7, beta = 10,
kappa = 1.01, 20 iterations, stopping early when the mean absolute weight error stops improving.
No calibration data: only the weights are used (so it takes a second for a whole model).
The result is a `QTensor` whose zero points are floats (fp16 in storage, as HQQ keeps them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import rtn
from .linear import QTensor

__all__ = ["hqq_quantize", "shrink_lp"]


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """Generalized soft-thresholding, the proximal step of the l_p (p <= 1) penalty."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-12).pow(p - 1) / beta)


@torch.no_grad()
def hqq_quantize(w: Tensor, bits: int, group_size: int | None = None, *, p: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, iters: int = 20) -> QTensor:
    """HQQ's quantized `w` (out_features x in_features) as a QTensor with float zero points.

    Groups of `group_size` consecutive input features per output row (None: one per row).
    """
    rtn.check_args(w, bits, group_size)
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1] (HQQ uses 0.7), got {p}")
    if beta <= 0 or kappa < 1 or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"need beta > 0, kappa >= 1 and an int iters >= 1, got {beta}, {kappa}, {iters!r}")
    rows, cols = w.shape
    group = group_size or cols
    W = w.float().reshape(rows * cols // group, group)  # (groups, group_size)
    qmax = 2**bits - 1

    # Step 1: start from min-max RTN; the scale stays fixed, the zero point becomes a float.
    scale, zero = rtn._grid(W, bits, symmetric=False)  # (groups, 1) each
    zero = zero.float()

    def dequantized(z: Tensor) -> tuple[Tensor, Tensor]:
        W_q = torch.clamp(torch.round(W / scale + z), 0, qmax)
        return W_q, scale * (W_q - z)

    best_error, best_zero = math.inf, zero
    for _ in range(iters):
        # Step 2: quantize with the current zero point; measure the error (mean |W - W_r|).
        W_q, W_r = dequantized(zero)
        error = (W - W_r).abs().mean().item()
        if error >= best_error:
            break  # HQQ's early stop: the last step did not help
        best_error, best_zero = error, zero
        # Step 3: the sparse error: large errors pass (shrunk), small ones become 0.
        W_e = shrink_lp(W - W_r, beta, p)
        # Step 4: the zero point that best explains W - W_e with the current integer codes.
        zero = torch.mean(W_q - (W - W_e) / scale, dim=1, keepdim=True)
        # Step 5: tighten the splitting.
        beta *= kappa
    W_q, _ = dequantized(best_zero)
    return rtn._state(W_q.reshape(rows, cols), scale.reshape(rows, -1, 1), best_zero.reshape(rows, -1, 1),
                      bits, False, group_size, w)
