"""Choosing layers in a model and swapping them: the one rule every model transform uses.

The rule is PEFT's for a list of `target_modules`: a layer is chosen when its qualified name (as
`model.named_modules()` gives it) equals a target or ends in "." + target:

    matches("model.layers.0.self_attn.q_proj", ["q_proj"])          True  (suffix)
    matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"]) True
    matches("model.layers.0.self_attn.q_proj", ["proj"])            False (not a whole name part)
    matches("lm_head", ["lm_head"])                                 True  (the whole name)

`linear_layers(model, targets=None, exclude=("lm_head",))` lists the nn.Linear layers a transform
applies to (every one when targets is None) minus those `exclude` matches, with the same rule.
`replace(model, name, module)` puts `module` where `name` was. apply_lora, apply_adapters,
prepare_qat/convert, quantize_model, the QA-LoRA, SmoothQuant and rotation transforms all use these,
and all follow one return convention, PyTorch's (`module.to`) and PEFT's (`get_peft_model`): they change
the model in place and return it. What they did is read off the model afterwards:
`count_trainable(model)`, `lora.lora_layers(model)`, and `model.quant_report` after `quantize_model`.
Experiments that must not change a model use a copy or a context manager (`quant.model.quantized`).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["count_trainable", "linear_layers", "matches", "normalize_names", "replace"]


def count_trainable(model: nn.Module) -> int:
    """Number of parameters that require a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def normalize_names(names, what: str = "target_modules") -> tuple[str, ...]:
    """A tuple of layer names from a string or an iterable of non-empty strings (else a clear error)."""
    if isinstance(names, str):
        names = (names,)
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(f"{what} must be a layer name or a list of names such as ['q_proj', 'v_proj'], "
                        f"got {names!r}") from None
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{what} must hold non-empty strings, got {names!r}")
    return names


def matches(name: str, targets: Iterable[str]) -> bool:
    """PEFT's rule: `name` equals a target or ends in '.' + target (module docstring)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_layers(model: nn.Module, targets: Iterable[str] | str | None = None,
                  exclude: Iterable[str] | str = ("lm_head",), *, kind: type = nn.Linear,
                  exact_type: bool = False) -> dict[str, nn.Module]:
    """The `kind` layers (nn.Linear by default; bitsandbytes' Linear4bit subclasses it) that `targets`
    match (all when None) and `exclude` does not, by qualified name, in `named_modules` order.

    exact_type=True skips subclasses (e.g. a QATLinear is not prepared again)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = None if targets is None else normalize_names(targets)
    exclude = normalize_names(exclude, "exclude") if exclude else ()
    chosen = {}
    for name, module in model.named_modules():
        is_kind = type(module) is kind if exact_type else isinstance(module, kind)
        if not is_kind or not name:
            continue
        if (targets is None or matches(name, targets)) and not matches(name, exclude):
            chosen[name] = module
    return chosen


def replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at the qualified `name` of `model` (in place); return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old
