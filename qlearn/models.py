"""Loading the course's language model: the embedded tiny Llama in data/tiny, or a hub model.

`load_model` is `AutoModelForCausalLM.from_pretrained` plus the choices a lesson makes explicit:
    name          "tiny" (data/tiny, shipped with the course), a local folder, or a hub id such as
                  "HuggingFaceTB/SmolLM2-135M" (needs the network or a local hub cache);
                  the environment variable QLEARN_MODEL overrides the default name
    quantization  None, "int8" (LLM.int8, bitsandbytes), "nf4" or "fp4" (4-bit, bitsandbytes), or
                  your own `transformers.BitsAndBytesConfig`
    device        where the model runs (default: `qlearn.get_device()`)
    dtype         the dtype of the unquantized tensors (default: float32 on the CPU, where most
                  processors have no fast bf16 matrix units, and bfloat16 on a GPU; float16 for
                  "int8", whose matrix products run in float16)

The 4-bit presets pass every setting explicitly, since BitsAndBytesConfig's defaults surprise
(fp4, no double quantization, float32 compute): "nf4" is QLoRA's recipe (NF4 + double
quantization + bf16 compute); "fp4" is the same with bitsandbytes' FP4 code book, so that the two
differ only in the code book. One deviation, on the CPU: the compute dtype is the model's dtype there
(float32), because most laptop and many server CPUs have no bf16 matrix units and emulate bf16 far more
slowly (measured on a 2-core AVX2 CPU: three QLoRA training steps of the embedded model take 37.7 s with
bf16 compute and 3.6 s with float32; a bf16 forward+backward of the unquantized model 64 s vs 3.8 s).
On a GPU the presets compute in bf16, QLoRA's choice.

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
`load_model(..., quantization="nf4"|"fp4")` on a CPU calls `keep_standard_layout(model)` before it returns,
which turns the repacking off (the path every other CPU and the GPU take); call it yourself after loading a
4-bit model with `from_pretrained` directly. `is_repacked(layer)` tells whether it happened.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .env import get_device
from .paths import data_dir

__all__ = ["QUANTIZATIONS", "bnb_config", "is_repacked", "keep_standard_layout", "load_model"]

QUANTIZATIONS = (None, "int8", "nf4", "fp4")


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


def bnb_config(quantization: str, compute_dtype: torch.dtype = torch.bfloat16):
    """The BitsAndBytesConfig behind a preset name ("int8", "nf4", "fp4"), every setting explicit;
    4-bit layers compute in `compute_dtype` (QLoRA's bf16 by default; load_model passes float32 on a CPU)."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    if quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    raise ValueError(f"quantization must be one of {QUANTIZATIONS} or a BitsAndBytesConfig, got {quantization!r}")


def _resolve(name: str | None) -> tuple[str, bool]:
    """(what from_pretrained gets, whether it is local)."""
    name = name or os.environ.get("QLEARN_MODEL") or "tiny"
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be 'tiny', a local folder or a hub id, got {name!r}")
    if name == "tiny":
        path = data_dir() / "tiny"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded model is missing at {path}: run from a full checkout of the course "
                "(git clone ...), or set QLEARN_DATA to the folder that holds tiny/")
        return str(path), True
    return name, Path(name).is_dir()


def _compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (QLoRA's choice); float32 on a CPU, where bf16 is emulated slowly (module docstring)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(name: str | None = None, *, quantization=None, device=None, dtype: torch.dtype | None = None):
    """Return `(model, tokenizer)` ready for inference (eval mode), on `device`.

    Offline with a hub id: a FileNotFoundError that names the fix (use "tiny", or fetch the model
    into the hub cache while online).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    source, local = _resolve(name)
    device = torch.device(device) if device is not None else get_device()
    if dtype is None:
        # LLM.int8 multiplies in float16: float16 activations avoid a cast (and bitsandbytes' warning
        # about it on every call); else bf16 on a GPU, float32 on a CPU.
        dtype = (torch.float16 if quantization == "int8" else
                 torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    kwargs = {"dtype": dtype}
    if quantization is not None:
        kwargs["quantization_config"] = (quantization if isinstance(quantization, BitsAndBytesConfig)
                                         else bnb_config(quantization, compute_dtype=_compute_dtype(device)))
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report of a quantized model is noise in a notebook
    hf_logging.disable_progress_bar()  # and so is a "Loading weights" bar for a 19 MB model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        if local:
            raise
        raise FileNotFoundError(
            f"could not load {source!r} from the Hugging Face hub ({type(err).__name__}). Offline? Use "
            "name='tiny' (the embedded model), or download it once while online "
            f"(`hf download {source}`) so that it is in the local cache.") from err
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if quantization is None:
        model.to(device)
    elif device.type == "cpu" and _linear4bit_layers(model):
        keep_standard_layout(model)  # before any forward pass (module docstring)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
