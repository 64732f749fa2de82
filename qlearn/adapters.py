"""Bottleneck adapters from scratch (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

A small trainable module with a residual connection, inserted into every frozen transformer block:

    adapter(h) = h + W_up f(W_down h + b_down) + b_up

    W_down  (m x d)  project the hidden size d down to the bottleneck m << d (nn.Linear's default init)
    f               a nonlinearity (GELU here; Houlsby et al. leave it open)
    W_up    (d x m)  project back up; W_up and b_up start at ZERO, so adapter(h) = h at step 0 and the
                    adapted model starts out exactly as the pretrained one (Houlsby et al. init near
                    identity for the same reason)

Houlsby et al. put one adapter after the attention sublayer and one after the MLP of each block,
before the residual addition; Pfeiffer et al. 2021 (AdapterFusion) found one adapter after the MLP
about as good at half the cost. qlearn does the latter: `apply_adapters` wraps each block's `mlp`,
so the block computes x + adapter(mlp(norm(x))). Trainable parameters per block: 2 d m + m + d.

Unlike LoRA, an adapter cannot be merged into the weights (the nonlinearity sits between W_down and
W_up), so it adds a little latency at inference: the reason LoRA displaced it for LLMs. The adapter
weights are fp32 even on a 16-bit base (as LoRA's in qlearn.lora and PEFT).
PEFT has no Houlsby adapter; the `adapters` library (AdapterHub) does ("seq_bn" = Pfeiffer's config).
"""

from __future__ import annotations

import torch
from torch import nn

from . import modules

__all__ = ["ACTIVATIONS", "AdaptedMLP", "BottleneckAdapter", "apply_adapters"]

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """h + up(f(down(h))) with `up` initialised to zero."""

    def __init__(self, hidden_size: int, bottleneck: int = 64, activation: str = "gelu",
                 device: torch.device | str | None = None):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive int, got {bottleneck!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.hidden_size, self.bottleneck = hidden_size, bottleneck
        self.down = nn.Linear(hidden_size, bottleneck, device=device)  # W_down: (m, d)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden_size, device=device)    # W_up: (d, m)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)  # fp32 adapter on a possibly 16-bit residual stream
        return (x + self.up(self.act(self.down(x)))).to(h.dtype)  # (..., d) -> (..., m) -> (..., d)


class AdaptedMLP(nn.Module):
    """A frozen MLP followed by a bottleneck adapter: adapter(mlp(x))."""

    def __init__(self, mlp: nn.Module, hidden_size: int, bottleneck: int = 64, activation: str = "gelu"):
        super().__init__()
        self.mlp = mlp
        device = next(mlp.parameters()).device
        self.adapter = BottleneckAdapter(hidden_size, bottleneck, activation, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.mlp(x))


def apply_adapters(model: nn.Module, bottleneck: int = 64, activation: str = "gelu",
                   target_modules=("mlp",)) -> nn.Module:
    """Freeze `model` and wrap every module that `target_modules` names (qlearn.modules.matches, PEFT's rule:
    a name or a name suffix; default each block's `mlp`) in an AdaptedMLP; in place, returns the model
    (modules.count_trainable counts what trains: 2 d m + m + d per adapter).

    Works on transformers' Llama-style models (`config.hidden_size` is the adapter's width d).
    """
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError("model must have config.hidden_size (a transformers model such as LlamaForCausalLM)")
    targets = modules.normalize_names(target_modules)
    chosen = [name for name, m in model.named_modules() if name and modules.matches(name, targets)
              and not isinstance(m, AdaptedMLP)  # adapted already
              and not isinstance(model.get_submodule(name.rpartition(".")[0]), AdaptedMLP)]  # its inner .mlp
    if not chosen:
        raise ValueError(f"found no module matching target_modules={list(targets)} to adapt "
                         "(or the model is adapted already)")
    model.requires_grad_(False)
    for name in chosen:
        modules.replace(model, name, AdaptedMLP(model.get_submodule(name), hidden, bottleneck, activation))
    return model
