"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's loss.

The layer loss for calibration inputs X (in_features x N tokens) is ||W X - Q X||^2, whose Hessian
with respect to a row of W is

    H = 2 X X^T                                   (in_features x in_features, the same for every row)

Quantizing column j to q_j (error e_j = (w_j - q_j) / [H^-1]_jj) is optimally compensated by

    W[:, j+1:] -= e_j [H^-1]_{j, j+1:}            (Optimal Brain Quantization, one column at a time)

after which H^-1 loses row and column j. GPTQ's two practical tricks:
- The successive inverses are the rows of the upper Cholesky factor U of H^-1 (H^-1 = U^T U), so
  [H^-1]_jj -> U_jj and [H^-1]_{j, j+1:} -> U_{j, j+1:}: one Cholesky, no matrix updates.
- Dampening: H += percdamp * mean(diag H) * I keeps the Cholesky stable (a few % of the diagonal).
Optional: lazy batches (apply the updates to the far columns once per batch of `lazy_batch_size` = 128
columns, same result up to float rounding, faster; the GPTQ reference calls this width `blocksize`,
renamed here because it is not a quantization block); groups (a scale and zero point per `group_size` columns,
fixed when the group's first column is reached, from the error-updated weights); act-order (quantize
columns in order of decreasing diag(H), the most active inputs first).
The grid itself is round-to-nearest min-max (`qlearn.quant.rtn`), so with a diagonal Hessian there is
nothing to compensate and GPTQ equals RTN exactly. The result is a `QTensor`: codes, the group grids,
and with act-order the column order (`perm`, GPTQ's g_idx) that `.dequantize()` undoes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import rtn
from .linear import QTensor

__all__ = ["gptq_quantize", "hessian"]


def hessian(x: Tensor) -> Tensor:
    """H = 2 X X^T / N (float32) from calibration inputs `x` of shape (..., in_features).

    Dividing by the number of tokens N changes nothing in GPTQ (only ratios of H^-1 entries and a
    relative dampening enter) and keeps the numbers in range.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of shape (..., in_features), got {getattr(x, 'shape', x)!r}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf: the calibration activations must be finite")
    x = x.reshape(-1, x.shape[-1]).float()  # (N, in_features)
    return 2.0 * x.T @ x / x.shape[0]


@torch.no_grad()
def gptq_quantize(w: Tensor, H: Tensor, bits: int, group_size: int | None = None, *,
                  symmetric: bool = False, percdamp: float = 0.01, lazy_batch_size: int = 128,
                  act_order: bool = False) -> QTensor:
    """GPTQ's quantized `w` (out_features x in_features) as a QTensor (`.dequantize()` in w's dtype).

    `H` is `hessian(x)` of the layer's inputs; `bits`, `group_size` and `symmetric` as in
    `rtn.quantize_rtn` (None: one scale and zero point per output row).
    """
    # Step 0: validate once (the column loop below calls only unchecked helpers).
    rtn.check_args(w, bits, group_size)
    cols = w.shape[1]
    if not isinstance(H, Tensor) or H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}) for a weight with {cols} input features, "
                         f"got {tuple(getattr(H, 'shape', ()))}")
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or inf: the calibration activations must be finite")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < 1:
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp!r}")
    if isinstance(lazy_batch_size, bool) or not isinstance(lazy_batch_size, int) or lazy_batch_size < 1:
        raise ValueError(f"lazy_batch_size must be a positive int, got {lazy_batch_size!r}")
    W = w.float().clone()
    H = H.float().clone()

    # Step 1: inputs that were always zero carry no information: fix their diagonal, zero their weights.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Step 2 (act-order): most active input channels first.
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]

    # Step 3: dampening, then the upper Cholesky factor of H^-1 (its rows are the successive inverses).
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    # Step 4: without groups, one scale and zero point per row from the whole (original) row.
    group = group_size or cols
    scales = torch.zeros(W.shape[0], cols // group, 1, device=W.device)  # (rows, groups, 1)
    zeros = torch.zeros_like(scales)
    if group_size is None:
        scale, zero = rtn._grid(W, bits, symmetric)  # (rows, 1) each
        scales[:, 0], zeros[:, 0] = scale, zero
    codes = torch.zeros_like(W)
    for i1 in range(0, cols, lazy_batch_size):
        i2 = min(i1 + lazy_batch_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            # Step 5: a new group starts: its grid from the current (error-updated) weights.
            if group_size is not None and (i1 + j) % group_size == 0:
                ahead = torch.cat([W1[:, j:], W[:, i2:]], dim=1)[:, :group_size]  # (rows, group_size)
                scale, zero = rtn._grid(ahead, bits, symmetric)
                scales[:, (i1 + j) // group_size], zeros[:, (i1 + j) // group_size] = scale, zero
            # Step 6: round column j to the grid; its error, scaled by the inverse Hessian's pivot...
            w_col = W1[:, j : j + 1]  # (rows, 1)
            code = rtn._round(w_col, scale, zero, bits, symmetric)
            codes[:, i1 + j] = code[:, 0]
            err = (w_col - (code - zero) * scale) / U1[j, j]  # (rows, 1)
            # Step 7: ...is pushed onto the not-yet-quantized columns of this batch.
            W1[:, j:] -= err @ U1[j : j + 1, j:]
            Err1[:, j] = err[:, 0]
        # Step 8 (lazy batch): the batch's accumulated errors update all later columns at once.
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    # Step 9: undo act-order's permutation. Per-row grids do not care about column order, so the codes go
    # back in place; groups of permuted columns do, so then the state keeps the order (GPTQ's g_idx) and
    # `.dequantize()` undoes it.
    if act_order and group_size is None:
        codes, act_order = codes[:, torch.argsort(perm)], False
    return rtn._state(codes, scales, zeros, bits, symmetric, group_size, w,
                      perm=perm.clone() if act_order else None)
