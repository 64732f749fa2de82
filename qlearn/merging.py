"""Merging LoRA adapters: into a quantized base (and what re-quantization erases), several adapters into one.

One adapter on one layer (notebook 06, `qlearn.lora`): dW = scaling * B @ A and W' = W + dW.

Into a 4-bit base. A 4-bit layer stores codes and block scales, not W, so merging means

    W_hat = dequantize(codes, absmax)            the weight the quantized model computes with
    W'    = quantize(W_hat + dW)                 re-quantized: a new absmax per block, new codes

(peft's `Linear4bit.merge`, tuners/lora/bnb.py). What the merged model really adds is

    dW_eff = dequantize(W') - W_hat              not dW

An element keeps its code while W_hat + dW stays on the same side of the midpoints between two code
book entries: NF4's steps are 0.08..0.28 x absmax, and a LoRA update is usually far smaller, so most
codes do not move, and those that do jump by a whole step. `requantize` measures this for one tensor,
`requantization_report` for every LoRA layer of a PEFT model on a bitsandbytes 4-bit base.
The safe path does not re-quantize: dequantize the base (`model.dequantize()` in transformers), merge
into that float weight, save; re-quantize later only if the size matters, and measure.

Several adapters on one base (peft's `add_weighted_adapter`, each adapter i with scaling s_i, weight w_i):

    "cat"     A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (rows), B' = [B_1, B_2, ...] (columns), scaling 1:
              B' A' = sum_i w_i s_i B_i A_i            the weighted sum of the updates, exactly (rank sum r_i)
    "linear"  A' = sum_i sqrt(w_i s_i) A_i, B' = sum_i sqrt(w_i s_i) B_i, scaling 1 (equal ranks):
              B' A' = sum_i w_i s_i B_i A_i + sum_{i != j} sqrt(w_i s_i w_j s_j) B_i A_j   (cross terms)

`combine_adapters` computes both from scratch (equal to peft's, tests/test_merging.py).

LoRA merged into a 4-bit base, on a whole model: `merge_lora_requantized` replaces every LoRALinear by
quantize(W_hat + s B A) in the base's format (NF4/FP4 blocks or RTN integer groups), the re-quantization
above; QA-LoRA (qlearn.qalora) is the merge that keeps every code.

Several adapters in ONE batch, unmerged (peft's mixed-batch inference, `adapter_names=[...]`, one per row):

    h_i = W x_i + s_a B_a A_a x_i          a = adapter_names[i]  ("__base__": no adapter)

The base product runs once for the whole batch; each adapter's rows go through its own A and B.
`mixed_batch_logits` / `mixed_batch_answers` serve two tasks in one batch; with separately=True they run
one batch per adapter instead (serving without mixed batches), and the two agree. Merging gives this up:
a merged model holds one adapter in its weights, and every row gets that one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import modules
from .quant import nf4

__all__ = ["COMBINATIONS", "QUANT_TYPES", "REQUANTIZE_METHODS", "Requantization", "RequantizationReport",
           "combine_adapters", "merge_lora_requantized", "mixed_batch_answers", "mixed_batch_logits",
           "requantization_report", "requantize"]

QUANT_TYPES = ("nf4", "fp4")
COMBINATIONS = ("cat", "linear")
REQUANTIZE_METHODS = ("nf4", "fp4", "rtn")


@dataclass
class Requantization:
    """One tensor merged into its 4-bit form: codes and dequantized weights before and after."""

    codes_before: Tensor  # uint8, the weight's shape
    codes_after: Tensor   # uint8
    w_before: Tensor      # float32, W_hat = dequantize(codes_before)
    w_after: Tensor       # float32, dequantize(quantize(W_hat + dW))
    delta: Tensor         # float32, the intended update dW

    @property
    def unchanged(self) -> float:
        """Fraction of elements whose 4-bit code did not change."""
        return (self.codes_before == self.codes_after).double().mean().item()

    @property
    def max_change(self) -> float:
        """max |dW_eff|, the largest change of a dequantized weight."""
        return (self.w_after - self.w_before).abs().max().item()

    @property
    def relative_error(self) -> float:
        """||dW_eff - dW|| / ||dW||: 0 when the update survives, about 1 when it is rounded away."""
        norm = self.delta.norm().item()
        if norm == 0:
            raise ValueError("the update dW is zero: nothing to compare (was B trained?)")
        return (self.w_after - self.w_before - self.delta).norm().item() / norm


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


@torch.no_grad()
def requantize(w_hat: Tensor, delta: Tensor, blocksize: int = 64, quant_type: str = "nf4") -> Requantization:
    """Merge `delta` into a weight that lives in 4 bits and re-quantize, as peft does for a 4-bit base.

    `w_hat` is the dequantized 4-bit weight (what the layer computes with). Re-quantizing `w_hat`
    itself gives back its codes (each block's largest element is exactly +-absmax, the code book
    holds +-1), so `codes_before` are the stored codes. Double quantization of the new absmax is
    left out: it moves the scales by ~0.1%, far less than the rounding studied here.
    """
    _check_quant_type(quant_type)
    if not isinstance(w_hat, Tensor) or not isinstance(delta, Tensor):
        raise TypeError("w_hat and delta must be torch.Tensors")
    if w_hat.shape != delta.shape:
        raise ValueError(f"delta must have w_hat's shape {tuple(w_hat.shape)}, got {tuple(delta.shape)}")
    if not torch.isfinite(delta).all():
        raise ValueError("delta contains NaN or inf: the adapter is broken")
    quantize = nf4.quantize_nf4 if quant_type == "nf4" else nf4.quantize_fp4
    w_hat, delta = w_hat.float(), delta.float()
    # Step 1: the codes as stored (re-quantizing the dequantized weight reproduces them).
    before = quantize(w_hat, blocksize)
    # Step 2: merge in float, re-quantize with fresh block scales.
    after = quantize(w_hat + delta, blocksize)
    return Requantization(before.codes, after.codes, before.dequantize(), after.dequantize(), delta)


@dataclass
class RequantizationReport:
    """`requantize` over every LoRA layer of a model: counts summed, maxima taken over layers."""

    layers: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # name -> (unchanged, max_change, rel. error)
    params: int = 0
    unchanged_params: int = 0
    max_change: float = 0.0
    max_delta: float = 0.0

    @property
    def unchanged(self) -> float:
        """Fraction of all merged weights whose 4-bit code did not change."""
        return self.unchanged_params / self.params

    def __repr__(self) -> str:
        return (f"RequantizationReport(layers={len(self.layers)}, params={self.params}, "
                f"unchanged={self.unchanged:.4f}, max_change={self.max_change:.4g}, max_delta={self.max_delta:.4g})")


@torch.no_grad()
def requantization_report(model, adapter_name: str = "default") -> RequantizationReport:
    """Run `requantize` on every LoRA layer of a PEFT `model` whose base layers are bitsandbytes 4-bit.

    Reads each layer's stored weight (`qlearn.lora.dequantized_weight`), its update
    (`get_delta_weight(adapter_name)`, peft's scaling * B @ A) and its quant_state's blocksize and
    quant_type; changes nothing.
    """
    from .lora import dequantized_weight

    report = RequantizationReport()
    for name, module in model.named_modules():
        if not hasattr(module, "get_delta_weight") or adapter_name not in getattr(module, "lora_A", {}):
            continue
        base = module.get_base_layer()
        state = getattr(base.weight, "quant_state", None)
        if state is None:
            raise ValueError(f"{name} has no 4-bit base (its weight is {base.weight.dtype}): load the model "
                             "with a 4-bit BitsAndBytesConfig, or merge it directly")
        r = requantize(dequantized_weight(base).float(), module.get_delta_weight(adapter_name).float(),
                       state.blocksize, state.quant_type)
        report.layers[name] = (r.unchanged, r.max_change, r.relative_error)
        report.params += r.delta.numel()
        report.unchanged_params += int((r.codes_before == r.codes_after).sum())
        report.max_change = max(report.max_change, r.max_change)
        report.max_delta = max(report.max_delta, r.delta.abs().max().item())
    if not report.layers:
        raise ValueError(f"the model has no LoRA layer with an adapter named {adapter_name!r}")
    return report


def combine_adapters(As: list[Tensor], Bs: list[Tensor], scalings: list[float], weights: list[float],
                     combination_type: str = "cat") -> tuple[Tensor, Tensor]:
    """One adapter (A', B') with scaling 1 from several, as peft's `add_weighted_adapter` builds it.

    As[i] is (r_i, in), Bs[i] is (out, r_i). "cat": B' A' = sum_i w_i s_i B_i A_i exactly, rank sum r_i;
    "linear": A' = sum_i sqrt(w_i s_i) A_i and B' likewise, rank r, with cross terms B_i A_j (i != j).
    A negative w_i s_i takes its sign on A's side only, as peft does.
    """
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    n = len(As)
    if n == 0 or not (len(Bs) == len(scalings) == len(weights) == n):
        raise ValueError(f"As, Bs, scalings and weights must be non-empty lists of equal length, got "
                         f"{len(As)}, {len(Bs)}, {len(scalings)}, {len(weights)}")
    for i, (A, B) in enumerate(zip(As, Bs)):
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"adapter {i}: A must be (r, in) and B (out, r), got A {tuple(A.shape)}, "
                             f"B {tuple(B.shape)}")
        if A.shape[1] != As[0].shape[1] or B.shape[0] != Bs[0].shape[0]:
            raise ValueError(f"adapter {i} has in/out features {A.shape[1]}/{B.shape[0]}, adapter 0 has "
                             f"{As[0].shape[1]}/{Bs[0].shape[0]}: adapters must target the same layer")
    if combination_type == "cat":
        A = torch.cat([w * s * A for A, s, w in zip(As, scalings, weights)], dim=0)  # (sum r_i, in)
        B = torch.cat(list(Bs), dim=1)  # (out, sum r_i)
        return A, B
    if len({A.shape[0] for A in As}) != 1:
        raise ValueError(f"combination_type='linear' needs adapters of equal rank, got ranks "
                         f"{[A.shape[0] for A in As]}; use 'cat'")
    roots = [math.sqrt(abs(w * s)) for s, w in zip(scalings, weights)]
    signs = [1.0 if w * s >= 0 else -1.0 for s, w in zip(scalings, weights)]
    A = sum(sign * root * A for A, root, sign in zip(As, roots, signs))  # (r, in)
    B = sum(root * B for B, root in zip(Bs, roots))  # (out, r)
    return A, B


@torch.no_grad()
def merge_lora_requantized(model: nn.Module, method: str = "nf4", bits: int = 4,
                           group_size: int = 64) -> nn.Module:
    """Replace every qlearn LoRALinear by an nn.Linear holding dequantize(quantize(W_hat + s B A)): LoRA
    merged into a 4-bit base (simulated, as quantize_model keeps weights). method "nf4"/"fp4": blocks of
    `group_size` (bits must be 4; peft's Linear4bit.merge, without double quantization); "rtn": `bits`-bit
    asymmetric integer groups of `group_size`, RTN's grid. In place, returns the model."""
    from .lora import lora_layers
    from .quant import quantize

    if method not in REQUANTIZE_METHODS:
        raise ValueError(f"method must be one of {REQUANTIZE_METHODS}, got {method!r}")
    if method != "rtn" and bits != 4:
        raise ValueError(f"{method} is a 4-bit code book: bits must be 4, got {bits!r}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model holds no LoRALinear layer: call qlearn.lora.apply_lora first")
    for name, layer in layers.items():
        merged = layer.merge()  # an nn.Linear holding W_hat + s B A (the base's dtype)
        w = merged.weight
        if method == "rtn":
            state = quantize(w, bits, symmetric=False, group_size=group_size)
        else:
            state = (nf4.quantize_nf4 if method == "nf4" else nf4.quantize_fp4)(w, group_size)
        w.copy_(state.dequantize())
        modules.replace(model, name, merged)
    return model


def _check_serving(model, n_rows: int, adapter_names) -> list[str]:
    names = list(adapter_names) if isinstance(adapter_names, (list, tuple)) else None
    if names is None or len(names) != n_rows or not all(isinstance(a, str) for a in names):
        raise ValueError(f"adapter_names must be a list of {n_rows} adapter names, one per row, got "
                         f"{adapter_names!r}")
    known = set(getattr(model, "peft_config", {})) | {"__base__"}
    if not set(names) <= known:
        raise ValueError(f"adapter_names holds {sorted(set(names) - known)}, not adapters of the model; "
                         f"it has {sorted(known)}")
    return names


def _each_adapter(model, names: list[str]):
    """Yield the rows of each adapter in turn with that adapter active ("__base__": adapters off), then
    make the adapter that was active before active again."""
    active = model.active_adapter
    try:
        for adapter in dict.fromkeys(names):  # first-seen order
            rows = [i for i, a in enumerate(names) if a == adapter]
            if adapter == "__base__":
                with model.disable_adapter():
                    yield rows
            else:
                model.set_adapter(adapter)
                yield rows
    finally:
        model.set_adapter(active)


@torch.no_grad()
def mixed_batch_logits(model, batch: dict[str, Tensor], adapter_names, *, separately: bool = False) -> Tensor:
    """Logits (B, T, vocab) of a PEFT `model` in which row i goes through adapter `adapter_names[i]`:
    one forward with peft's `adapter_names=` (default), or one forward per adapter on its rows."""
    names = _check_serving(model, batch["input_ids"].shape[0], adapter_names)
    was_training = model.training
    model.eval()  # peft refuses adapter_names in training mode
    try:
        if not separately:
            return model(**batch, adapter_names=names).logits
        logits = None
        for rows in _each_adapter(model, names):
            part = model(**{k: v[rows] for k, v in batch.items()}).logits  # (len(rows), T, vocab)
            logits = part.new_zeros(len(names), *part.shape[1:]) if logits is None else logits
            logits[rows] = part
        return logits
    finally:
        model.train(was_training)


@torch.no_grad()
def mixed_batch_answers(model, tokenizer, prompts: list[str], adapter_names, *, separately: bool = False,
                        max_new_tokens: int = 40) -> list[str]:
    """Greedy answers of a PEFT `model` (cut at end-of-text or a newline, as qlearn.tasks.generate), prompt
    i through adapter `adapter_names[i]`: all in one batch with peft's `adapter_names=` (default), or one
    batch per adapter, put back in the prompts' order."""
    names = _check_serving(model, len(prompts), adapter_names)
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # so every prompt ends where generation starts

    def generate(texts: list[str], **kwargs) -> list[str]:
        enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, **kwargs,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return [tokenizer.decode(row, skip_special_tokens=True).split("\n")[0]
                for row in out[:, enc.input_ids.shape[1]:]]

    try:
        if not separately:
            return generate(list(prompts), adapter_names=names)
        answers = [""] * len(prompts)
        for rows in _each_adapter(model, names):
            for i, text in zip(rows, generate([prompts[i] for i in rows]), strict=True):
                answers[i] = text
        return answers
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
