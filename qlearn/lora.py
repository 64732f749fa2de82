"""LoRA from scratch: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021).

For a frozen weight W (out x in) and an input x (..., in):

    h = W x + b + scaling * B A dropout(x),      scaling = alpha / r

    A  (r x in)   Kaiming-uniform (a = sqrt(5), nn.Linear's default and PEFT's init_lora_weights=True)
    B  (out x r)  zeros, so the wrapped layer starts out exactly equal to the base layer

Only A and B train: r (in + out) parameters instead of in x out. Merging folds the update into the
weight, after which inference costs nothing extra:

    merge:    W' = W + scaling * B @ A
    unmerge:  W  = W' - scaling * B @ A      (equal to W up to the rounding of the two additions)

qlearn's names are PEFT's (`peft.tuners.lora.layer.Linear`): `A` is `lora_A[name].weight`, `B` is
`lora_B[name].weight`, `r`, `alpha` is `lora_alpha`, `scaling`, `base` is `base_layer`; same A and B
give the same output (tests/test_lora.py). What PEFT adds on top of this one line: many layer types,
several named adapters per layer, rsLoRA (scaling = alpha / sqrt(r)), DoRA/PiSSA variants and inits,
fan_in_fan_out for GPT-2's Conv1D, safe merging, mixed-adapter batches.

The base may also be a bitsandbytes `Linear4bit` (QLoRA, Dettmers et al. 2023) or `Linear8bitLt`:
their forward dequantizes on the fly, so the same wrapper trains them. Merging in place into a
quantized base would re-quantize W + scaling * B A and can erase a small update (peft#2321), so
`merge()` returns a dequantized 16/32-bit nn.Linear instead (the safe path, notebook 07) and
`merge_()` refuses.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "LoRALinear",
    "apply_lora",
    "count_trainable",
    "dequantized_weight",
    "is_quantized",
    "lora_layers",
    "merge_lora",
]


def is_quantized(layer: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear layer (whose weight is not a float tensor)."""
    return not layer.weight.is_floating_point() or hasattr(layer.weight, "quant_state")


@torch.no_grad()
def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight (out x in) as a float tensor, dequantizing a bitsandbytes weight."""
    weight = base.weight
    if getattr(weight, "quant_state", None) is not None:  # Params4bit: NF4/FP4 codes + blockwise absmax
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state)  # (out, in) in the quant_state's dtype
    if getattr(weight, "SCB", None) is not None:  # Int8Params (LLM.int8): int8 codes, one absmax per row
        return weight.data.float() * (weight.SCB.float() / 127).unsqueeze(1)  # (out, in) * (out, 1)
    if not weight.is_floating_point():
        raise ValueError(f"cannot dequantize a {type(base).__name__} weight of dtype {weight.dtype}")
    return weight.data


class LoRALinear(nn.Module):
    """`base(x) + scaling * (dropout(x) @ A.T @ B.T)` around a frozen nn.Linear (or bitsandbytes layer)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):  # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear
            raise TypeError(f"base must be an nn.Linear (or a bitsandbytes Linear4bit/Linear8bitLt), "
                            f"got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # fp32 adapters even on a 16-bit or 4-bit base, as PEFT does (autocast_adapter_dtype=True):
        # AdamW's small updates to A and B would be rounded away in bf16's 8-bit mantissa.
        device = base.weight.device
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=device))   # (r, in)
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, the (out x in) update LoRA adds to W."""
        return (self.B @ self.A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:  # the update already sits in base.weight
            return result
        x = x.to(self.A.dtype)
        # lora_B(lora_A(dropout(x))) * scaling, in PEFT's order, so that the two agree to float rounding
        update = (self.dropout(x) @ self.A.T @ self.B.T) * self.scaling  # (..., in) -> (..., r) -> (..., out)
        return (result + update).to(result.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A in float32 (W dequantized first for a quantized base)."""
        w = dequantized_weight(self.base).float()
        merged = w if self.merged else w + self.delta_weight().float()
        if not torch.isfinite(merged).all():
            raise ValueError("the merged weight holds NaN or inf: A or B is broken")
        return merged

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A NEW plain nn.Linear holding W' = W + scaling * B @ A; this wrapper is left unchanged.

        The new layer has the base weight's dtype; for a quantized base, the layer's compute dtype
        (bf16 in QLoRA) or bf16: merging into the dequantized weight is the safe path.
        """
        merged = self.merged_weight()
        dtype = self.base.weight.dtype
        if is_quantized(self.base):
            dtype = getattr(self.base, "compute_dtype", None) or torch.bfloat16
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=merged.device, dtype=dtype)
        out.weight.copy_(merged.to(dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias.to(dtype))
        return out.requires_grad_(False)

    @torch.no_grad()
    def merge_(self) -> LoRALinear:
        """Merge in place, W <- W + scaling * B @ A, keeping A and B so that `unmerge_()` can undo it."""
        if is_quantized(self.base):
            raise ValueError("cannot merge in place into a quantized base: re-quantizing W + scaling*B@A "
                             "rounds small updates away (peft#2321). Use merge(), which returns a "
                             "dequantized nn.Linear, or merge into a bf16/fp32 copy of the base")
        if self.merged:
            raise RuntimeError("already merged: call unmerge_() first")
        weight = self.base.weight
        merged = weight.float() + self.delta_weight().float()  # one rounding, to the weight's dtype
        if not torch.isfinite(merged).all():
            raise ValueError("the merged weight holds NaN or inf: A or B is broken")
        weight.copy_(merged.to(weight.dtype))
        self.merged = True
        return self

    @torch.no_grad()
    def unmerge_(self) -> LoRALinear:
        """Undo `merge_()`: W <- W' - scaling * B @ A (the old W up to one rounding each way)."""
        if not self.merged:
            raise RuntimeError("not merged: call merge_() first")
        weight = self.base.weight
        weight.copy_((weight.float() - self.delta_weight().float()).to(weight.dtype))
        self.merged = False
        return self

    unmerge = unmerge_  # the name the issue uses

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}")


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of target_modules: the full name equals a target or ends in '.' + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def count_trainable(model: nn.Module) -> int:
    """Number of parameters that require a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def apply_lora(model: nn.Module, target_modules, r: int = 8, alpha: float = 16,
               dropout: float = 0.0) -> tuple[nn.Module, int]:
    """Wrap every nn.Linear whose name ends in one of `target_modules` in a LoRALinear; freeze the rest.

    Returns `(model, trainable_params)` (the model is changed in place). Layers are wrapped in the
    order of `named_modules`, as PEFT does, so after the same seed A is initialised as PEFT's (tested).
    """
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of module names such as "
                         f"['q_proj', 'v_proj'], got {target_modules!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)
             and not n.endswith(".base")]
    if not names:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matches target_modules={list(targets)}; the model's linear layers "
                         f"are named {linears}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout))
    return model, count_trainable(model)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear layers by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged plain nn.Linear (W + scaling * B @ A); in place, returns the model."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model holds no LoRALinear layer: call apply_lora first")
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merge())
    return model
