"""A small training loop: AdamW on the trainable parameters, gradient accumulation, mixed precision.

One optimizer step k (k = 1..steps) with G = grad_accum micro-batches b_1..b_G:

    loss_k = (1/G) * sum_g loss(b_g)                  # the mean, so G micro-batches of size n act like
                                                      # one batch of size G*n (for equal token counts)
    g      = clip(grad loss_k, max_grad_norm)         # global L2 norm clipping
    lr_k   = lr * min(1, k / warmup)                  # linear warmup, then constant ("linear": then decay to 0)
    theta  = AdamW(theta, g, lr_k, weight_decay)      # torch.optim.AdamW on params with requires_grad

Only parameters with `requires_grad=True` are optimized (after `apply_lora`, freeze-tuning or PEFT
only those are), so the optimizer holds states for them alone: that is the memory PEFT saves.

Mixed precision ("auto"): on a CUDA GPU with bf16 support, forward and backward run under
`torch.autocast(dtype=torch.bfloat16)` while the weights, their gradients and AdamW's states stay in
their own dtype (fp32 master weights when the model is fp32). On the CPU "auto" means no autocast:
most CPUs have no fast bf16 matrix units, so autocast is slower there, and fp32 keeps the course's
printed numbers bit-for-bit repeatable. Ask for "bf16" to force it, "no" to turn it off.
bf16 needs no loss scaling (its range is fp32's), unlike fp16, which is not offered here.

`fit` returns a `FitResult`: the list of per-step losses, with `.seconds`, `.tokens`,
`.tokens_per_s` and `.peak_memory` (bytes, CUDA only) attached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["MIXED_PRECISION", "SCHEDULES", "FitResult", "fit", "resolve_autocast"]

MIXED_PRECISION = ("auto", "bf16", "no")
SCHEDULES = ("constant", "linear")


class FitResult(list):
    """The loss history (a list of floats, one per optimizer step) plus a short report."""

    def __init__(self, losses: list[float], *, seconds: float, tokens: int, peak_memory: int | None,
                 autocast: torch.dtype | None):
        super().__init__(losses)
        self.seconds = seconds          # wall-clock time of the loop
        self.tokens = tokens            # non-padding tokens seen (attention_mask summed)
        self.tokens_per_s = tokens / seconds if seconds > 0 else float("inf")
        self.peak_memory = peak_memory  # torch.cuda.max_memory_allocated during fit, None off CUDA
        self.autocast = autocast        # the autocast dtype used, None when off

    @property
    def losses(self) -> list[float]:
        return list(self)

    def __repr__(self) -> str:
        mem = "" if self.peak_memory is None else f", peak_memory={self.peak_memory / 2**20:.0f} MiB"
        first = f"{self[0]:.3f}" if self else "-"
        last = f"{self[-1]:.3f}" if self else "-"
        return (f"FitResult(steps={len(self)}, loss {first} -> {last}, {self.seconds:.1f} s, "
                f"{self.tokens_per_s:.0f} tokens/s{mem})")


def resolve_autocast(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `fit` uses for `mixed_precision` on `device` (None: no autocast)."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if mixed_precision == "no":
        return None
    if mixed_precision == "bf16":
        return torch.bfloat16
    # "auto": bf16 on a CUDA GPU that supports it; none on the CPU (slower there, and not bit-repeatable)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _check(steps, lr, grad_accum, weight_decay, warmup, max_grad_norm, schedule) -> None:
    def positive_int(name, v):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")

    positive_int("steps", steps)
    positive_int("grad_accum", grad_accum)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0 (steps), got {warmup!r}")
    if max_grad_norm is not None and (not isinstance(max_grad_norm, (int, float)) or max_grad_norm <= 0):
        raise ValueError(f"max_grad_norm must be None (no clipping) or a number > 0, got {max_grad_norm!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of lr at optimizer step `step` (1-based)."""
    if warmup and step <= warmup:
        return step / warmup
    if schedule == "linear":  # 1 right after warmup, down to 1/(steps - warmup) at the last step
        return (steps - step + 1) / (steps - warmup)
    return 1.0


def fit(model: nn.Module, batches: Iterable[dict], steps: int, lr: float, *, grad_accum: int = 1,
        weight_decay: float = 0.0, warmup: int = 0, schedule: str = "constant",
        mixed_precision: str = "auto", seed: int = 0, progress: bool = True,
        max_grad_norm: float | None = 1.0, optimizer: torch.optim.Optimizer | None = None) -> FitResult:
    """Train `model` for `steps` optimizer steps on `batches`; return the per-step losses (a FitResult).

    `batches` yields dicts of input_ids, attention_mask, labels (as `qlearn.tasks.batches`); the model
    must return `.loss` when given labels (every transformers causal LM and PEFT model does).
    `optimizer` replaces the default AdamW (e.g. a bitsandbytes paged optimizer); lr and weight_decay
    then come from it. Deterministic on the CPU for a given `seed` (it seeds dropout, if any).
    """
    from tqdm.auto import tqdm

    _check(steps, lr, grad_accum, weight_decay, warmup, max_grad_norm, schedule)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every requires_grad is False): "
                         "apply LoRA, unfreeze some layers, or call requires_grad_(True)")
    device = params[0].device
    autocast = resolve_autocast(mixed_precision, device)
    torch.manual_seed(seed)
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    it = iter(batches)
    was_training = model.training
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(range(1, steps + 1), disable=not progress, desc="fit", leave=False)
    try:
        for step in bar:
            # Step 1: the learning rate of this step
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * _lr_factor(step, steps, warmup, schedule)
            # Step 2: accumulate the gradient of the mean loss over grad_accum micro-batches
            total = 0.0
            for _ in range(grad_accum):
                try:
                    batch = next(it)
                except StopIteration:
                    raise ValueError(f"batches ran out after {len(losses)} steps; pass an endless iterator "
                                     "(qlearn.tasks.batches) or more batches") from None
                batch = {k: v.to(device) for k, v in batch.items()}
                tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                    loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss is {loss.item()} at step {step}: lower lr, or check the "
                                             "data (a batch whose labels are all -100 gives NaN)")
                (loss / grad_accum).backward()
                total += loss.item()
            # Step 3: clip, step, clear
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total / grad_accum)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        model.train(was_training)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    return FitResult(losses, seconds=time.perf_counter() - start, tokens=tokens, peak_memory=peak,
                     autocast=autocast)
