"""QLoRA glue: keep bitsandbytes' 4-bit layers trainable and mergeable on a CPU.

QLoRA (Dettmers et al. 2023) trains LoRA adapters on a frozen base stored in NF4 with double
quantization: the base is `transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...)`, then `peft.prepare_model_for_kbit_training`
and `peft.get_peft_model`. Each `bitsandbytes.nn.Linear4bit` computes

    y = x @ dequantize(codes, absmax).T          (compute dtype; the codes never change)

and gradients flow through it to the LoRA layers below.

A trap of bitsandbytes 0.50 on a CPU with AVX512-BF16 (most recent Intel/AMD server CPUs): the first
time a Linear4bit runs in eval mode without gradients (generation, perplexity), it repacks its weight
in place for a fast CPU kernel: a tiled layout, absmax rounded to bf16, double quantization undone
(`bitsandbytes.nn.modules.Linear4bit.forward`). From then on
  1. training passes no gradient through the layer to its input (the kernel has no autograd formula;
     torch only warns "an autograd kernel was not registered"), so every LoRA layer below it trains
     on a wrong gradient;
  2. `bitsandbytes.functional.dequantize_4bit`, which PEFT's 4-bit merge and transformers'
     `model.dequantize()` use, misreads the tiled layout and returns wrong weights;
  3. outputs change a little (bf16 absmax).
`keep_standard_layout(model)` turns the repacking off (the path every other CPU and the GPU take).
Call it right after loading a 4-bit model on a CPU.
"""

from __future__ import annotations

from torch import nn

__all__ = ["is_repacked", "keep_standard_layout"]


def _linear4bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def is_repacked(layer: nn.Module) -> bool:
    """True if bitsandbytes' CPU inference path has repacked this Linear4bit's weight."""
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_standard_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking the model's 4-bit layers on a CPU; return how many layers.

    Raises ValueError if the model has no Linear4bit layer, or if one is already repacked (its
    gradient path and dequantization are broken: reload the model and call this first).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = _linear4bit_layers(model)
    if not layers:
        raise ValueError("the model has no bitsandbytes Linear4bit layer: load it with "
                         "BitsAndBytesConfig(load_in_4bit=True, ...) first")
    repacked = [n for n, m in layers.items() if is_repacked(m)]
    if repacked:
        raise ValueError(f"{len(repacked)} layers (e.g. {repacked[0]}) were already repacked by an eval-mode "
                         "forward pass: reload the model and call keep_standard_layout before running it")
    for layer in layers.values():
        layer.support_avx512bf16_for_cpu = False  # the flag Linear4bit.forward checks before repacking
    return len(layers)
