"""Triton kernels for bitsandbytes' NF4 weights (GPU; on a CPU only under Triton's interpreter).

    dequantize_4bit(packed, quant_state)   the weight, bit for bit bitsandbytes' dequantize_4bit  (nf4.py)
    gemv_4bit(x, packed, quant_state)      x @ W.T for a few rows of x, W never formed            (gemv.py)
    NF4Linear, use_nf4_kernels(model)      a Linear4bit running them; swap a model's layers       (linear.py)
    to_linear4bit(model)                   a 16-bit model's linears as bitsandbytes NF4 layers    (linear.py)

They read bitsandbytes' own storage (packed bytes + QuantState, double quantization included), so a
Linear4bit's weight works as it is. Why they are fast is the lesson of notebook 10: both are
memory-bound, and a 4-bit weight is about 3.6x fewer bytes than bf16 (benchmarks/nf4_kernel.py).

Triton ships with CUDA PyTorch. It is imported on first use of a name below, never by `import qlearn`
or `import qlearn.kernels`, so the CPU course does not need it; without it the first use raises an
ImportError that names the fix. On a CPU, TRITON_INTERPRET=1 set before Triton is first imported
(before Python starts, or before importing bitsandbytes, which imports Triton) runs the kernels in
Triton's interpreter: exact, slow, what tests/test_kernels.py does on the CPU.
"""

from __future__ import annotations

import importlib

__all__ = ["BLOCK_K", "GEMV_ROWS", "ROWS", "TILE", "UNROLL", "NF4Linear", "dequantize_4bit", "gemv_4bit",
           "round_to_bf16", "to_linear4bit", "tolerance", "use_nf4_kernels"]
_NAMES = {  # name -> the module that defines it
    "dequantize_4bit": "nf4", "round_to_bf16": "nf4", "TILE": "nf4",
    "gemv_4bit": "gemv", "tolerance": "gemv", "BLOCK_K": "gemv", "ROWS": "gemv", "UNROLL": "gemv",
    "NF4Linear": "linear", "use_nf4_kernels": "linear", "to_linear4bit": "linear", "GEMV_ROWS": "linear",
}


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
