"""qlearn: the helper library of the course on making large language models fit.

One concept per module:
    qlearn.env        seeds, device, environment report
    qlearn.models     load_model: the embedded tiny Llama (data/tiny) or a hub model
    qlearn.evaluate   perplexity
    qlearn.tasks      the fine-tuning task data and its exact-match evaluation
    qlearn.formats    floating-point and integer number formats, from the bit fields
    qlearn.quant      linear quantization, packing, NF4/FP4, RTN, GPTQ, AWQ, HQQ, QAT
    qlearn.lora       LoRA from scratch
    qlearn.train      a small training loop
    qlearn.memory     bits per parameter and the training-memory ledger
    qlearn.check      exercise checkers
Heavy modules are imported on first use so that `import qlearn` stays fast.
"""

from __future__ import annotations

import importlib

from .env import EnvironmentReport, environment_report, get_device, on_colab, seed_everything

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("qlearn.models", "load_model"),
    "perplexity": ("qlearn.evaluate", "perplexity"),
}
_SUBMODULES = {"models", "evaluate", "tasks", "formats", "quant", "lora", "train", "memory", "check",
               "adapters", "paths"}

__all__ = ["EnvironmentReport", "environment_report", "get_device", "on_colab", "seed_everything",
           *_LAZY, *sorted(_SUBMODULES)]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"qlearn.{name}")
    raise AttributeError(f"module 'qlearn' has no attribute {name!r}")
