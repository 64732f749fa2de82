"""Storage bits per parameter of a format name, scales included.

`bits_per_param(fmt)`: storage cost per weight, scales included (b = bits of a code, B = block size,
N = values in the tensor, given as `numel=`):
    fp32 32, fp16 / bf16 16, fp8 8
    nf4, fp4 (bitsandbytes)   4 + 32/B                          fp32 absmax per block: 4.5 at B = 64
        double_quant=True     4 + 8/B + 32/(256 B)              absmax in 8 bits, blocks of 256, one fp32
                                                                scale per 256 blocks: 4.127 (QLoRA Sec. 3:
                                                                0.373 bits saved per parameter)
    llm.int8 (bitsandbytes)   8 + 32/row_length                 one fp32 scale per row (8 without row_length)
    int2 .. int8 (groups)     b + 16/B (+ z/B with zero_point)  fp16 scale (and a z-bit zero point) per group of B;
                                                                blocksize=None: per row of row_length
    block-scaled floats (BLOCK_FORMATS; qlearn.formats.mx, qlearn.formats.fp8), default B their own:
        mxfp4, mxfp6, mxfp8   b + 8/B, B = 32                   E8M0 scale per 32: 4.25, 6.25, 8.25 (OCP MX)
        nvfp4                 4 + 8/B + 32/N, B = 16            E4M3 per 16, fp32 per tensor: 4.5 (+ 32/N only
                                                                when numel is given)
        fp8_tensorwise        8 + 32/N                          one fp32 scale per tensor (8 without numel)
        fp8_rowwise           8 + 32/row_length                 one fp32 scale per row (8 without row_length)
        deepseek_fp8_weight   8 + 32/B, B = 128 x 128           DeepSeek-V3: fp32 scale per 128x128 block: 8.002
        deepseek_fp8_act      8 + 32/B, B = 128                 DeepSeek-V3: fp32 scale per 1x128 tile: 8.25
    GGUF (llama.cpp)          8 * bytes_per_block / block_size  each layout below, as gguf.GGML_QUANT_SIZES:
        q8_0 8.5, q4_0 4.5, q4_1 5.0, q5_0 5.5, q5_1 6.0, q2_k 2.625, q3_k 3.4375, q4_k 4.5, q5_k 5.5,
        q6_k 6.5625, q8_k 9.125; i-quants iq2_xxs 2.0625, iq3_xxs 3.0625, iq4_xs 4.25, iq4_nl 4.5;
        mxfp4 4.25 (the same bits as OCP MXFP4: 16 bytes of E2M1 codes + one E8M0 byte per 32)

Every formula is `qlearn.quant.state.bits_per_param` (the one storage formula of the library)
with the format's code bits, block size and scale bits.
"""

from __future__ import annotations

from ..quant.state import bits_per_param as _formula

__all__ = ["BLOCK_FORMATS", "FLOAT_BITS", "GGUF_LAYOUTS", "bits_per_param"]

FLOAT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8}
# name: (values per block, bytes per block, layout); llama.cpp's ggml-common.h, checked against gguf's table
GGUF_LAYOUTS = {
    "q8_0": (32, 34, "32 int8 codes + fp16 scale"),
    "q4_0": (32, 18, "32 4-bit codes (16 bytes) + fp16 scale"),
    "q4_1": (32, 20, "32 4-bit codes + fp16 scale + fp16 minimum"),
    "q5_0": (32, 22, "32 low nibbles (16) + 32 fifth bits (4) + fp16 scale"),
    "q5_1": (32, 24, "as q5_0 + fp16 minimum"),
    "q2_k": (256, 84, "2-bit codes (64) + 16 4-bit scale/min pairs (16) + fp16 d, dmin (4)"),
    "q3_k": (256, 110, "low 2 bits (64) + high bits (32) + 16 6-bit scales (12) + fp16 d (2)"),
    "q4_k": (256, 144, "4-bit codes (128) + 8 6-bit scales and mins (12) + fp16 d, dmin (4)"),
    "q5_k": (256, 176, "low nibbles (128) + fifth bits (32) + scales and mins (12) + fp16 d, dmin (4)"),
    "q6_k": (256, 210, "low nibbles (128) + high 2 bits (64) + 16 int8 scales (16) + fp16 d (2)"),
    "q8_k": (256, 292, "256 int8 codes + fp32 d (4) + 16 int16 block sums (32)"),
    "iq2_xxs": (256, 66, ("fp16 d (2) + per 32 weights 8 bytes (64): four 8-bit indices into a 256-entry grid "
                          "of 8 magnitudes each, 4 x 7 sign bits, a 4-bit scale")),
    "iq3_xxs": (256, 98, ("fp16 d (2) + 64 8-bit indices into a 256-entry grid of 4 magnitudes (64) + per 32 "
                          "weights 4 x 7 sign bits and a 4-bit scale (32)")),
    "iq4_xs": (256, 136, "4-bit indices into iq4_nl's table (128) + 8 6-bit scales (6) + fp16 d (2)"),
    "iq4_nl": (32, 18, "32 4-bit indices into a 16-value non-linear table (16) + fp16 scale"),
    "mxfp4": (32, 17, "32 E2M1 codes (16) + one E8M0 scale (1): OCP MXFP4"),
}
# name: (code bits, values per block scale or None, scale bits, tensor-scale bits): qlearn.formats.mx / fp8
BLOCK_FORMATS = {
    "mxfp4": (4, 32, 8, 0),
    "mxfp6": (6, 32, 8, 0),
    "mxfp8": (8, 32, 8, 0),
    "nvfp4": (4, 16, 8, 32),
    "fp8_tensorwise": (8, None, 0, 32),
    "fp8_rowwise": (8, None, 32, 0),  # one scale per row: the block is the row (row_length)
    "deepseek_fp8_weight": (8, 128 * 128, 32, 0),
    "deepseek_fp8_act": (8, 128, 32, 0),
}


class _FormatDefault:
    """The `blocksize` default: 64 for nf4/fp4/int2..int8, each block-scaled format's own block otherwise."""

    def __repr__(self) -> str:
        return "<the format's own: 64, MX 32, NVFP4 16>"


FORMAT_DEFAULT = _FormatDefault()


def bits_per_param(fmt: str, blocksize: int | None = FORMAT_DEFAULT, double_quant: bool = False, *,
                   row_length: int | None = None, zero_point: bool = False, zero_point_bits: int = 16,
                   numel: int | None = None) -> float:
    """Storage bits per parameter of `fmt`, scales included (formulas in the module docstring).

    `blocksize` is the block (group) size of nf4/fp4/int2..int8 (default 64; None for intN means one scale
    per row of `row_length` values) and of the block-scaled formats (default their own: 32 for MX, 16 for
    NVFP4, 128 x 128 and 128 for DeepSeek's weights and activations). "llm.int8" is LLM.int8 as bitsandbytes
    stores it (one fp32 scale per row). `numel` (the tensor's size) adds a per-tensor scale's 32/N where a
    format has one (nvfp4, fp8_tensorwise); other formats have none, and their answer does not change.
    `zero_point_bits` is what a zero point costs with `zero_point=True`: 16 (an fp16 zero point, HQQ's) or the
    code width b when it is packed as an integer (GPTQ and AWQ checkpoints: 4 + (16 + 4)/128 = 4.156 bits).
    """
    if not isinstance(fmt, str):
        raise TypeError(f"fmt must be a format name such as 'bf16', 'nf4' or 'q4_k', got {fmt!r}")
    if row_length is not None and (isinstance(row_length, bool) or not isinstance(row_length, int)
                                   or row_length < 1):
        raise ValueError(f"row_length must be None or a positive int, got {row_length!r}")
    if numel is not None and (isinstance(numel, bool) or not isinstance(numel, int) or numel < 1):
        raise ValueError(f"numel must be None or a positive int, got {numel!r}")
    name = fmt.lower()
    if name in BLOCK_FORMATS:
        return _block_format(name, blocksize, row_length, numel)
    if name in FLOAT_BITS:
        return float(FLOAT_BITS[name])
    if name in GGUF_LAYOUTS:  # llama.cpp's own accounting: bytes per block (gguf.GGML_QUANT_SIZES)
        block, nbytes, _ = GGUF_LAYOUTS[name]
        return 8 * nbytes / block
    if name == "llm.int8":  # 8-bit codes + one fp32 scale per row (overhead left out without row_length)
        return _formula(8, row_length, scale_bits=32) if row_length else 8.0
    is_int = name.startswith("int") and name[3:].isdigit() and 2 <= int(name[3:]) <= 8
    if name not in ("nf4", "fp4") and not is_int:
        raise ValueError(f"fmt must be one of {sorted(FLOAT_BITS)}, 'nf4', 'fp4', 'int2'..'int8', 'llm.int8', "
                         f"a block-scaled float {sorted(BLOCK_FORMATS)} or a GGUF type {sorted(GGUF_LAYOUTS)}, "
                         f"got {fmt!r}")
    blocksize = 64 if blocksize is FORMAT_DEFAULT else blocksize
    if isinstance(zero_point_bits, bool) or not isinstance(zero_point_bits, int) or not 1 <= zero_point_bits <= 32:
        raise ValueError(f"zero_point_bits must be an int in 1..32, got {zero_point_bits!r}")
    zero_bits = zero_point_bits if zero_point else 0
    if blocksize is None and is_int:  # one scale (and zero point) per row
        return _formula(int(name[3:]), row_length, scale_bits=16, zero_point_bits=zero_bits) if row_length \
            else float(int(name[3:]))
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if is_int:  # an fp16 scale (and an fp16 zero point) per group of blocksize values
        return _formula(int(name[3:]), blocksize, scale_bits=16, zero_point_bits=zero_bits)
    if double_quant:  # 8-bit absmax per block, one fp32 scale per 256 blocks
        return _formula(4, blocksize, scale_bits=8, nested_block_size=256, nested_scale_bits=32)
    return _formula(4, blocksize, scale_bits=32)  # fp32 absmax per block


def _block_format(name: str, blocksize, row_length: int | None, numel: int | None) -> float:
    code_bits, own_block, scale_bits, tensor_bits = BLOCK_FORMATS[name]
    if own_block is None:  # fp8_tensorwise, fp8_rowwise: the block is the tensor or the row
        if blocksize is not FORMAT_DEFAULT:
            raise ValueError(f"blocksize does not apply to {name} (its scale covers the whole "
                             f"{'tensor' if name == 'fp8_tensorwise' else 'row'}), got {blocksize!r}")
        if name == "fp8_rowwise":  # the scales' overhead left out without row_length, as for llm.int8
            return _formula(code_bits, row_length, scale_bits=scale_bits) if row_length else float(code_bits)
        return _formula(code_bits, tensor_bits=tensor_bits, numel=numel)
    blocksize = own_block if blocksize is FORMAT_DEFAULT else blocksize
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    return _formula(code_bits, blocksize, scale_bits=scale_bits, tensor_bits=tensor_bits, numel=numel)
