"""Number formats, built from their bit fields.

    qlearn.formats.floats   fp32/fp16/bf16, fp8 E4M3/E5M2, fp4 E2M1, fp6 E2M3/E3M2, int8/int4: decode, encode,
                            round_to (the names below are re-exported from it)
    qlearn.formats.mx       block-scaled floats: MXFP8/MXFP6/MXFP4 (E8M0 scales, quantize_mx) and NVFP4 (E4M3
                            scales + a tensor scale, quantize_nvfp4), bit for bit with torchao; MXState
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
from .mx import MXState, mx_clipped, quantize_mx, quantize_nvfp4, shared_exponent, torchao_available

__all__ = ["FLOAT_FORMATS", "FORMATS", "FP6_FORMATS", "INT_FORMATS", "FloatBits", "FormatInfo", "MXState", "bits",
           "decode", "encode", "info", "mx_clipped", "quantize_mx", "quantize_nvfp4", "round_to", "shared_exponent",
           "torchao_available", "values"]
