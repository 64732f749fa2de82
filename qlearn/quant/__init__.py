"""Quantization, one idea per module. Every quantizer returns a QuantState (`state`): data plus
everything needed to undo it, with `.dequantize()`, `.bits_per_param()` and a readable repr.

    state         the QuantState protocol and the one storage formula (bits per parameter)
    linear        quantize(x, bits, symmetric, axis, group_size) -> QTensor (scale, zero point); the two
                  rounding rules of torch ("zero_point_first", "zero_point_after")
    packing       pack/unpack 2-, 3- and 4-bit codes into bytes
    codebook      k-means (codebook) quantization, the bridge to NF4 and AQLM -> Codebook
    nf4           the NF4 and bitsandbytes-FP4 code books, blockwise absmax, double quantization -> Blockwise
    rtn           round-to-nearest with groups -> QTensor
    gptq          GPTQ: second-order error feedback from calibration activations -> QTensor
    awq           AWQ: activation-aware per-channel scales -> QTensor with input scales
    hqq           HQQ: calibration-free half-quadratic optimization of the zero point -> QTensor
    model         quantize_model / quantized / quantize_copy: a method on every linear layer, with a report
    qat           fake quantization with the straight-through estimator, QATLinear, prepare_qat/convert
    activations   activation quantization (per tensor, per token; dynamic, static) and simulated W8A8
    llm_int8      LLM.int8: vector-wise int8 with the mixed-precision decomposition of outlier features
    smoothquant   SmoothQuant: move activation outliers into the weights, function-preserving
    rotation      rotations of the residual stream (QuaRot-style), function-preserving

Names are imported on first use (`qlearn.quant.quantize`, `qlearn.quant.nf4.codebook()`).
"""

from __future__ import annotations

import importlib
import pkgutil

_MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))
_EXPORTS = {
    "QuantState": "state",
    "QTensor": "linear",
    "quantize": "linear",
    "pack": "packing",
    "unpack": "packing",
    "quantize_model": "model",
    "quantized": "model",
    "quantize_copy": "model",
    "fake_quantize": "qat",
    "QATLinear": "qat",
    "prepare_qat": "qat",
    "convert": "qat",
}

__all__ = [*_MODULES, *_EXPORTS]


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"qlearn.quant.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"qlearn.quant.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'qlearn.quant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
