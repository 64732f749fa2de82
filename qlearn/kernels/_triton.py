"""Importing Triton, or saying how to get it; where the kernels may run.

Triton ships with the CUDA builds of PyTorch; the CPU course does not need it. On a CPU, Triton's
interpreter runs the same kernels on CPU tensors with NumPy: slow, but exact, which is what the CPU
tests use. It is chosen by TRITON_INTERPRET=1 when a kernel is defined, for Triton's own functions
(tl.sum, tl.interleave) when Triton is first imported, which bitsandbytes does: so set it before
Python starts (`TRITON_INTERPRET=1 python ...`), or at least before importing bitsandbytes.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "qlearn.kernels needs Triton. It ships with the CUDA builds of PyTorch (pip install torch); on a "
        "CPU-only machine `pip install triton` gives its interpreter: run with TRITON_INTERPRET=1."
    ) from err

__all__ = ["INTERPRET", "check_device", "tl", "triton"]

# Read once, as triton.jit reads it when the kernels are defined (just after this module).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET and type(tl.sum).__name__ != "InterpretedFunction":
    raise ImportError("TRITON_INTERPRET=1 was set after Triton had been imported (bitsandbytes imports it), so "
                      "Triton's own functions are compiled for a GPU, not interpreted: set it before Python "
                      "starts, e.g. TRITON_INTERPRET=1 python ...")


def check_device(**tensors: torch.Tensor) -> torch.device:
    """The one device all `tensors` (keyword name = tensor) live on: CUDA, or the CPU under the
    interpreter. Raises ValueError naming the tensor otherwise."""
    device = None
    for name, t in tensors.items():
        if t.device.type != "cuda" and not (INTERPRET and t.device.type == "cpu"):
            raise ValueError(
                f"{name} is on {t.device}, but the Triton kernels run on a CUDA GPU: move it with "
                f".cuda(). (On a CPU only Triton's interpreter runs them: set TRITON_INTERPRET=1 "
                f"before importing qlearn.kernels.)")
        if device is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}: "
                             f"move them to one device")
        device = t.device
    return device
