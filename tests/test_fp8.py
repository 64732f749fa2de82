"""qlearn.formats.fp8 against torchao.float8 0.18 (codes, scales, Float8Linear) and torch._scaled_mm on the CPU."""

import math

import pytest
import torch

from qlearn import memory
from qlearn.formats import fp8

DTYPES = [torch.float32, torch.bfloat16]
TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# torch._scaled_mm sums in float32, qlearn's emulation exactly (module docstring): measured 2e-7 for K = 256
FLOAT32_SUM = 1e-6


def _torchao_float8():
    pytest.importorskip("torchao")
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import LinearMMConfig

    def cast(x, fmt, rowwise=False, power_of_2=False):
        gran = ScalingGranularity.AXISWISE if rowwise else ScalingGranularity.TENSORWISE
        return hp_tensor_to_float8_dynamic(x, TORCH_FP8[fmt], LinearMMConfig(), scaling_granularity=gran,
                                           axiswise_dim=-1 if rowwise else None, round_scales_to_power_of_2=power_of_2)
    return cast


def data(shape=(64, 256), seed=0, spread=(-2, 2)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(*spread, shape[-1])


def weight(shape=(128, 256), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.05


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", fp8.FP8_FORMATS)
@pytest.mark.parametrize("block, rowwise, power_of_2", [(None, False, False), ("row", True, False), ("row", True, True)])
def test_codes_and_scales_equal_torchao_float8(block, rowwise, power_of_2, fmt, dtype):
    cast = _torchao_float8()
    x = data().to(dtype)
    ref = cast(x, fmt, rowwise, power_of_2)
    state = fp8.quantize_fp8(x, fmt, block, power_of_2=power_of_2)
    assert torch.equal(state.codes, ref._data.view(torch.uint8))
    assert torch.equal(state.scale.reshape(ref._scale.shape), ref._scale)
    assert torch.equal(state.dequantize(torch.float32), ref._data.float() / ref._scale)  # x̂ = q / s


def test_deepseek_tiles_and_blocks_are_torchaos_rowwise_and_tensorwise_on_their_views():
    cast = _torchao_float8()
    x, w = data((8, 512), seed=2), weight((256, 256), seed=3)
    tiles = fp8.quantize_fp8(x, block_size=(1, 128))  # 1 x 128: rowwise on the (-1, 128) view
    ref = cast(x.reshape(-1, 128), "fp8_e4m3", rowwise=True)
    assert torch.equal(tiles.codes.reshape(-1, 128), ref._data.view(torch.uint8))
    assert torch.equal(tiles.scale.reshape(-1, 1), ref._scale)
    blocks = fp8.quantize_fp8(w, block_size=(128, 128))  # 128 x 128: tensorwise on each block
    for i in range(2):
        for j in range(2):
            ref = cast(w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)].contiguous(), "fp8_e4m3")
            assert torch.equal(blocks.codes[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)], ref._data.view(torch.uint8))
            assert blocks.scale[i, j] == ref._scale


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_scaled_mm_matches_torch_scaled_mm_on_the_cpu(recipe):
    block_a, block_b, pow2 = fp8.RECIPES[recipe]
    a = fp8.quantize_fp8(data(), block_size=block_a, power_of_2=pow2)
    b = fp8.quantize_fp8(weight(), block_size=block_b, power_of_2=pow2)
    assert fp8.relative_error(fp8.torch_scaled_mm(a, b), fp8.scaled_mm(a, b)) < FLOAT32_SUM


def test_fp8_matmul_matches_torchaos_float8_linear_forward_and_e5m2_backward():
    pytest.importorskip("torchao")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    x, w = data(seed=4, spread=(0, 0)), weight(seed=5)
    go = torch.randn(64, 128, generator=torch.Generator().manual_seed(6)) * 1e-3
    for recipe in ("tensorwise", "rowwise"):
        layer = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False))
        with torch.no_grad():
            layer[0].weight.copy_(w)
        convert_to_float8_training(layer, config=Float8LinearConfig.from_recipe_name(recipe))
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.backward(go)
        if recipe == "tensorwise":  # float32 output; gradients in E5M2 (torchao's default for grad_output)
            assert fp8.relative_error(y.detach(), fp8.fp8_matmul(x, w, recipe)) < FLOAT32_SUM
            grad = fp8.scaled_mm(fp8.quantize_fp8(go, "fp8_e5m2"), fp8.quantize_fp8(w.T.contiguous()))
            assert fp8.relative_error(xg.grad, grad) < FLOAT32_SUM
        else:  # torchao's rowwise recipe asks torch._scaled_mm for bf16 output: the same bits here
            assert torch.equal(y.detach(), fp8.fp8_matmul(x, w, recipe, out_dtype=torch.bfloat16).float())


def test_blockwise_scaled_mm_is_the_product_of_the_dequantized_tensors():
    x, w = data((16, 384), seed=7), weight((256, 384), seed=8)
    a, b = fp8.quantize_fp8(x, block_size=(1, 128)), fp8.quantize_fp8(w, block_size=(128, 128))
    dq = (a.codes_2d().double() * a.inverse_scale().double()) @ (b.codes_2d().double() * b.inverse_scale().double()).T
    # the same sum in another order, in float64: they differ by float64 rounding only
    assert fp8.relative_error(fp8.scaled_mm(a, b), dq) < 1e-7
    assert fp8.relative_error(fp8.fp8_matmul(x, w, "blockwise"), dq) < 1e-7
    # and a scale applied to the wrong K-block would be far off
    wrong = fp8.quantize_fp8(w.flip(1), block_size=(128, 128))
    assert fp8.relative_error(fp8.scaled_mm(a, wrong), dq) > 0.1


def test_fp8_states_count_the_bits_memory_counts():
    x = data((64, 256))
    assert fp8.quantize_fp8(x).bits_per_param() == memory.bits_per_param("fp8_tensorwise", numel=x.numel())
    assert fp8.quantize_fp8(x, block_size="row").bits_per_param() == memory.bits_per_param("fp8_rowwise", row_length=256)
    assert fp8.quantize_fp8(x, block_size=(1, 128)).bits_per_param() == memory.bits_per_param("deepseek_fp8_act") == 8.25
    w = weight((256, 256))
    assert fp8.quantize_fp8(w, block_size=(128, 128)).bits_per_param() == memory.bits_per_param("deepseek_fp8_weight")
    assert repr(fp8.quantize_fp8(x, block_size="row", power_of_2=True)) == (
        "FP8State(bits=8, rowwise, fp32 scales (powers of two), shape=(64, 256), dtype=torch.float32, "
        "fmt='fp8_e4m3', bits_per_param=8.125)")


def test_recipe_errors_against_float32_with_and_without_outlier_channels():
    # exact emulation on fixed data: the numbers below hold to many digits on any CPU (the float32 reference
    # matmul differs between CPUs in its last bits only, 1e-7 relative)
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(256, 768, generator=g), torch.randn(256, 768, generator=g) * 0.05
    outliers = x.clone()
    outliers[:, [3, 200, 500]] *= 50  # three channels 50x larger (LLM.int8's outlier features)
    for a in (x, outliers):
        errs = {r: fp8.relative_error(fp8.fp8_matmul(a, w, r), a @ w.T) for r in fp8.RECIPES}
        bf16 = fp8.relative_error((a.bfloat16() @ w.bfloat16().T).float(), a @ w.T)
        # every recipe is set by E4M3's 3 mantissa bits (relative rounding up to 2^-4): about 13x bf16's error
        assert all(0.02 < e < 2**-4 for e in errs.values()) and max(errs.values()) > 8 * bf16, (errs, bf16)
    assert errs["blockwise"] < 0.85 * errs["tensorwise"], errs  # with outliers, 1x128 tiles help (0.029 vs 0.037)


def test_e4m3_is_more_precise_and_e5m2_keeps_the_small_gradients():
    g = torch.Generator().manual_seed(10)
    grad = torch.randn(4096, generator=g) * torch.exp(2.5 * torch.randn(4096, generator=g))  # many binades
    r = fp8.range_vs_precision(grad)
    e4, e5 = r["fp8_e4m3"], r["fp8_e5m2"]
    assert round(e4.binades, 1) == 17.8 and round(e5.binades, 1) == 31.8
    assert e4.flushed > 0.05 and e5.flushed == 0.0  # measured 8.3% of the entries lost in E4M3
    assert e4.rel_error < e5.rel_error  # 0.027 vs 0.037: where values survive, E4M3's mantissa bit wins


def test_zeros_quantize_to_zeros():
    z = torch.zeros(4, 128)
    s = fp8.quantize_fp8(z, block_size=(1, 128))
    assert torch.equal(s.dequantize(), z) and math.isfinite(s.scale.max().item())


@pytest.mark.parametrize("call, error, match", [
    (lambda: fp8.quantize_fp8(torch.ones(4, 8), "fp8_e3m4"), ValueError, r"fmt must be one of \('fp8_e4m3', 'fp8_e5m2'\)"),
    (lambda: fp8.quantize_fp8(torch.ones(4, 100), block_size=(1, 128)), ValueError,
     r"block_size \(1, 128\) must divide the 2-D view of x, \(rows, K\) = \(4, 100\)"),
    (lambda: fp8.quantize_fp8(torch.ones(4, 8), block_size=(1, 0)), ValueError, "block_size must be None"),
    (lambda: fp8.quantize_fp8(torch.ones(4, 8), block_size="column"), ValueError, "block_size must be None"),
    (lambda: fp8.quantize_fp8(torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must be a floating-point tensor"),
    (lambda: fp8.quantize_fp8(torch.tensor([1.0, math.inf])), ValueError, "x contains NaN or inf"),
    (lambda: fp8.fp8_matmul(torch.ones(4, 8), torch.ones(2, 8), "colwise"), ValueError, "recipe must be one of"),
    (lambda: fp8.scaled_mm(fp8.quantize_fp8(torch.ones(4, 8)), fp8.quantize_fp8(torch.ones(2, 4))), ValueError,
     "b must be \\(N, K\\) with a's K"),
    (lambda: fp8.scaled_mm(torch.ones(4, 8), torch.ones(2, 8)), TypeError, "a and b must be FP8State"),
    (lambda: fp8.torch_scaled_mm(fp8.quantize_fp8(torch.ones(2, 128), block_size=(1, 128)),
                                 fp8.quantize_fp8(torch.ones(128, 128), block_size=(128, 128))), ValueError,
     "blockwise needs CUDA"),
])
def test_bad_input_raises_errors_naming_the_parameter(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_gpu_benchmark_runs_on_the_cpu_and_records_what_fails(tmp_path):
    import argparse
    import importlib.util

    from qlearn.paths import ROOT

    spec = importlib.util.spec_from_file_location("fp8_bench", ROOT / "benchmarks" / "fp8_scaled_mm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = {"rows": [], "errors": []}
    bench.run(argparse.Namespace(device="cpu", sizes=[128]), result)
    row = result["rows"][0]
    assert set(row["error_vs_fp32"]) == {"bf16", "tensorwise", "tensorwise_fast_accum", "rowwise"}
    assert row["vs_qlearn_emulation"]["rowwise"]["identical_bf16"]  # torch's CPU kernel: the same bits
    assert [e["recipe"] for e in result["errors"]] == ["blockwise"]  # CUDA only: recorded, not raised
