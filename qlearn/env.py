"""The environment every notebook starts from: seeds, the device, and a report of what is installed.

`seed_everything(seed)` seeds Python's `random`, NumPy and torch (CPU and every CUDA device) and asks
torch for deterministic algorithms where that costs nothing on the CPU, so that a notebook prints
the same numbers on every run (nbval re-checks them in CI).
"""

from __future__ import annotations

import logging
import os
import platform
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# bitsandbytes (0.50, CPUs with AVX512-BF16) tries the optional `kernels` package for a faster 4-bit
# CPU matmul and logs a warning when it is missing; it then uses its own kernel, which is correct.
# The course needs no hub kernels (and cannot download them offline), so the warning is silenced.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# torchao (imported by transformers and peft when installed) logs "Failed to load ... .so" for its CUDA-only
# extensions on a CPU, and registers enums with torch's pytree, which torch 2.13 answers with a deprecation
# warning. Both are harmless; they would be stderr noise in every notebook (and fail nbval's comparison).
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
# PEFT 0.21's PeftModel.__init__ reads model.is_gradient_checkpointing, which transformers 5 deprecated: every
# get_peft_model call warns, about a name the course never uses (pyproject's filterwarnings does the same for tests).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__all__ = ["EnvironmentReport", "cpu_name", "environment_report", "get_device", "on_colab", "seed_everything"]

_DEVICES = ("auto", "cpu", "cuda")


def seed_everything(seed: int = 0) -> int:
    """Seed `random`, NumPy and torch (all devices) with `seed`; return it.

    CPU results are bit-for-bit repeatable after this; on a GPU some kernels stay nondeterministic
    (atomics in backward passes), which is why GPU outputs are compared with tolerances.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    return seed


def get_device(prefer: str | None = None) -> torch.device:
    """The device a notebook runs on: "cuda" when a CUDA GPU is visible, else "cpu".

    `prefer` (or the environment variable QLEARN_DEVICE) forces one of "auto", "cpu", "cuda".
    Asking for "cuda" where there is none is an error, not a silent fallback.
    """
    choice = (prefer or os.environ.get("QLEARN_DEVICE") or "auto").lower()
    if choice not in _DEVICES:
        raise ValueError(f"prefer must be one of {_DEVICES}, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("prefer='cuda' but torch sees no CUDA GPU; use prefer='cpu' or 'auto'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def on_colab() -> bool:
    """True inside Google Colab (its runtime sets COLAB_RELEASE_TAG)."""
    return "COLAB_RELEASE_TAG" in os.environ or "COLAB_GPU" in os.environ


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


@dataclass
class EnvironmentReport:
    """What a notebook runs on. `str()` gives a short table; the fields are for asserts."""

    python: str
    platform: str
    torch: str
    device: str
    device_name: str
    gpu_memory_gb: float | None
    cpu_threads: int
    versions: dict[str, str | None] = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [
            ("python", self.python),
            ("platform", self.platform),
            ("torch", self.torch),
            ("device", f"{self.device} ({self.device_name})"),
        ]
        if self.gpu_memory_gb is not None:
            rows.append(("gpu memory", f"{self.gpu_memory_gb:.1f} GB"))
        rows.append(("cpu threads", str(self.cpu_threads)))
        rows += [(k, v or "not installed") for k, v in self.versions.items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cpu_name() -> str:
    """The processor's name as lscpu prints it (Linux: /proc/cpuinfo's "model name"), else platform's guess.

    Benchmarks record it: float results differ in their last digits from one CPU to another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment_report() -> EnvironmentReport:
    """Collect Python, torch, device and library versions (no network, no model loading)."""
    device = get_device()
    name, mem = platform.processor() or platform.machine(), None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, mem = props.name, props.total_memory / 1e9
    libs = ("transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers")
    return EnvironmentReport(
        python=platform.python_version(),
        platform=platform.platform(terse=True),
        torch=torch.__version__,
        device=device.type,
        device_name=name,
        gpu_memory_gb=mem,
        cpu_threads=torch.get_num_threads(),
        versions={lib: _version(lib) for lib in libs},
    )
