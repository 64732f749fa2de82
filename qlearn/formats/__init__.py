"""Number formats, built from their bit fields.

    qlearn.formats.floats   fp32/fp16/bf16, fp8 E4M3/E5M2, fp4 E2M1, fp6 E2M3/E3M2, int8/int4: decode, encode,
                            round_to
    qlearn.formats.mx       block-scaled floats: MXFP8/MXFP6/MXFP4 (E8M0 scales, quantize_mx) and NVFP4 (E4M3
                            scales + a tensor scale, quantize_nvfp4), bit for bit with torchao; MXState
    qlearn.formats.fp8      FP8 training recipes emulated: tensorwise, rowwise and DeepSeek-V3 blockwise scaled
                            matmuls (quantize_fp8, scaled_mm, fp8_matmul); E4M3 forward, E5M2 gradients
The names below are re-exported from them.
"""

from .floats import (
                     FLOAT_FORMATS,
                     FORMATS,
                     FP6_FORMATS,
                     INT_FORMATS,
                     FloatBits,
                     FormatInfo,
                     bits,
                     decode,
                     encode,
                     info,
                     round_to,
                     values,
)
from .fp8 import FP8State, fp8_matmul, quantize_fp8, scaled_mm
from .mx import MXState, mx_clipped, quantize_mx, quantize_nvfp4, shared_exponent, torchao_available

__all__ = ["FLOAT_FORMATS", "FORMATS", "FP6_FORMATS", "INT_FORMATS", "FP8State", "FloatBits", "FormatInfo",
           "MXState", "bits", "decode", "encode", "fp8_matmul", "info", "mx_clipped", "quantize_fp8", "quantize_mx",
           "quantize_nvfp4", "round_to", "scaled_mm", "shared_exponent", "torchao_available", "values"]
