"""Quantization, one idea per module:

    linear    quantize(x, bits, symmetric, axis, group_size) -> QTensor (scale, zero point)
    packing   pack/unpack 2-, 3- and 4-bit codes into bytes
    codebook  k-means (codebook) quantization, the bridge to NF4 and AQLM
    nf4       the NF4 and bitsandbytes-FP4 code books, blockwise absmax, double quantization
    rtn       round-to-nearest with groups
    gptq      GPTQ: second-order error feedback from calibration activations
    awq       AWQ: activation-aware per-channel scales
    hqq       HQQ: calibration-free half-quadratic optimization of scale and zero point
    model     quantize_model: apply a method to every linear layer, report bits per parameter
    qat       fake quantization with the straight-through estimator, QATLinear, prepare_qat/convert

Names are imported on first use (`qlearn.quant.quantize`, `qlearn.quant.nf4.codebook()`).
"""

from __future__ import annotations

import importlib

_MODULES = ("linear", "packing", "codebook", "nf4", "rtn", "gptq", "awq", "hqq", "model", "qat")
_EXPORTS = {
    "QTensor": "linear",
    "quantize": "linear",
    "pack": "packing",
    "unpack": "packing",
    "quantize_model": "model",
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
