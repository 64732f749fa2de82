"""Number formats, built from their bit fields.

    qlearn.formats.floats   fp32/fp16/bf16, fp8 E4M3/E5M2, fp4 E2M1, int8/int4: decode, encode, round_to
                            (the names below are re-exported from it)
"""

from .floats import (
                     FLOAT_FORMATS,
                     FORMATS,
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

__all__ = ["FLOAT_FORMATS", "FORMATS", "INT_FORMATS", "FloatBits", "FormatInfo", "bits", "decode", "encode",
           "info", "round_to", "values"]
