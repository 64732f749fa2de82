"""qlearn: the helper library of the course on making large language models fit.

The library, one concept per module:
    qlearn.env         seeds, device, environment report
    qlearn.models      load_model: the embedded tiny Llama (data/tiny) or a hub model (and the bitsandbytes CPU guard)
    qlearn.evaluate    perplexity
    qlearn.tasks       the fine-tuning task data and its exact-match evaluation
    qlearn.formats     number formats from their bit fields; block-scaled MX/NVFP4 and FP8 recipes
    qlearn.quant       the quantized-state protocol, linear quantization, NF4/FP4, RTN, GPTQ, AWQ, HQQ, QAT, ...
    qlearn.modules     which layers a transform touches, and swapping them
    qlearn.outliers    outlier features: measuring them, and a model variant that has them
    qlearn.lora        LoRA from scratch (and rsLoRA, DoRA, PiSSA, LoftQ)
    qlearn.qalora      QA-LoRA: LoRA that merges losslessly into a group-quantized base
    qlearn.adapters    bottleneck adapters
    qlearn.merging     merging adapters: into bf16, into 4 bits, several adapters at once
    qlearn.train       a small training loop
    qlearn.experiment  runs over seeds, mean and spread, "A beats B" only beyond the spread
    qlearn.memory      bits per parameter and the training-memory ledger
    qlearn.gguf_export GGUF files written from scratch
    qlearn.gpu_lab     measuring peak memory and step time on a GPU
    qlearn.kernels     Triton kernels for NF4 (GPU only)
    qlearn.fsdp        FSDP-QLoRA across processes (python -m qlearn.fsdp)
    qlearn.paths       where data/ and notebooks/ are
The course tooling, apart from the library:
    qlearn.course      the `qlearn` command, doctor, notebook runner, exercises, notebook conventions
    qlearn.check       the exercise checkers, one module per notebook (qlearn.check.nb03, ...)

Every module is imported on first use (`qlearn.merging`, `qlearn.quant.gptq`), so `import qlearn` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil

from .env import EnvironmentReport, environment_report, get_device, on_colab, seed_everything

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("qlearn.models", "load_model"),
    "perplexity": ("qlearn.evaluate", "perplexity"),
}
# Every module and subpackage of qlearn (read from the package folder, so none can be left out).
_SUBMODULES = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}

__all__ = ["EnvironmentReport", "environment_report", "get_device", "on_colab", "seed_everything",
           *_LAZY, *sorted(_SUBMODULES)]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"qlearn.{name}")
    raise AttributeError(f"module 'qlearn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
