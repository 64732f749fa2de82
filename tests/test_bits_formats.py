"""qlearn.memory.bits_per_param for the block-scaled formats and GGUF's i-quants: the figures, gguf's block table,
and each quantizer's own state counting the same bits."""

import pytest
import torch

from qlearn import memory
from qlearn.formats import mx
from qlearn.memory.bits import BLOCK_FORMATS

IQUANTS = {"iq2_xxs": 2.0625, "iq3_xxs": 3.0625, "iq4_xs": 4.25, "iq4_nl": 4.5, "mxfp4": 4.25}


def test_block_scaled_formats_cost_their_scales():
    figures = {f: memory.bits_per_param(f) for f in ("mxfp4", "mxfp6", "mxfp8", "nvfp4", "deepseek_fp8_act")}
    assert figures == {"mxfp4": 4.25, "mxfp6": 6.25, "mxfp8": 8.25, "nvfp4": 4.5, "deepseek_fp8_act": 8.25}
    weight = memory.bits_per_param("deepseek_fp8_weight")  # one fp32 scale per 128 x 128 block
    assert weight == 8 + 32 / (128 * 128) and round(weight, 3) == 8.002
    assert memory.bits_per_param("mxfp4", 16) == 4.5  # another block size: MX's scale every 16 values
    assert memory.bits_per_param("FP8_TensorWise") == 8.0 and memory.bits_per_param("fp8_rowwise", row_length=4096) == 8 + 32 / 4096


def test_a_tensor_scale_counts_only_when_the_tensor_size_is_given():
    n = 4096 * 4096
    assert memory.bits_per_param("nvfp4", numel=n) == 4 + 8 / 16 + 32 / n
    assert memory.bits_per_param("nvfp4", numel=256) == 4.625
    assert memory.bits_per_param("fp8_tensorwise", numel=1024) == 8 + 32 / 1024
    assert memory.bits_per_param("mxfp4", numel=1024) == 4.25  # no tensor scale: numel changes nothing
    assert memory.bits_per_param("nf4", numel=1024) == 4.5


@pytest.mark.parametrize("name", sorted(IQUANTS))
def test_iquant_and_mxfp4_layouts_match_the_gguf_packages_block_table(name):
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]
    assert memory.GGUF_LAYOUTS[name][:2] == (block, nbytes)
    assert memory.bits_per_param(name) == 8 * nbytes / block == IQUANTS[name]


def test_gguf_mxfp4_is_ocp_mxfp4():
    block, nbytes, _ = memory.GGUF_LAYOUTS["mxfp4"]
    assert 8 * nbytes / block == memory.bits_per_param("mxfp4") == BLOCK_FORMATS["mxfp4"][0] + 8 / 32


@pytest.mark.parametrize("elem, name", [("fp4_e2m1", "mxfp4"), ("fp6_e2m3", "mxfp6"), ("fp6_e3m2", "mxfp6"),
                                        ("fp8_e4m3", "mxfp8"), ("fp8_e5m2", "mxfp8")])
def test_mx_states_count_the_same_bits(elem, name):
    x = torch.randn(8, 64)
    assert mx.quantize_mx(x, elem).bits_per_param() == memory.bits_per_param(name)
    assert mx.quantize_mx(x, elem, 16).bits_per_param() == memory.bits_per_param(name, 16)


def test_nvfp4_states_count_the_same_bits():
    x = torch.randn(8, 64)
    assert mx.quantize_nvfp4(x).bits_per_param() == memory.bits_per_param("nvfp4", numel=x.numel()) == 4.5 + 32 / 512
    assert mx.quantize_nvfp4(x, False).bits_per_param() == memory.bits_per_param("nvfp4") == 4.5


@pytest.mark.parametrize("kwargs, match", [
    ({"fmt": "fp8_tensorwise", "blocksize": 128}, "blocksize does not apply to fp8_tensorwise"),
    ({"fmt": "mxfp4", "blocksize": 0}, "blocksize must be a positive int, got 0"),
    ({"fmt": "mxfp4", "blocksize": None}, "blocksize must be a positive int, got None"),
    ({"fmt": "nvfp4", "numel": 0}, "numel must be None or a positive int, got 0"),
    ({"fmt": "mxfp5"}, r"fmt must be one of .*a block-scaled float \['deepseek_fp8_act'"),
])
def test_bad_input_names_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memory.bits_per_param(**kwargs)
