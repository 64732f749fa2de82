"""qlearn.formats.mx against torchao 0.18's MX and NVFP4 reference code, bit for bit (codes, scales, values)."""

import math
import subprocess
import sys

import pytest
import torch

from qlearn.formats import floats, mx

needs_torchao = pytest.mark.skipif(not mx.torchao_available(), reason="torchao not installed")
ELEMS = list(mx.MX_EMAX)
DTYPES = [torch.float32, torch.bfloat16]  # the input dtypes torchao's MX and NVFP4 code accept
TORCHAO_DTYPE = {"fp4_e2m1": torch.float4_e2m1fn_x2, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
                 "fp6_e2m3": "fp6_e2m3", "fp6_e3m2": "fp6_e3m2"}


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor):
    """Equal bit patterns (so -0.0 != +0.0) in the same dtype and shape."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    view = torch.int32 if got.dtype == torch.float32 else torch.int16
    same = got.view(view) == expected.view(view)
    if not same.all():
        i = (~same).nonzero()[:3].tolist()
        pytest.fail(f"{int((~same).sum())} of {same.numel()} differ, e.g. at {i}: "
                    f"{[expected[tuple(j)].item() for j in i]} expected, {[got[tuple(j)].item() for j in i]} got")


def randn(shape, seed=0, spread=(-3, 3)):
    """Normal values whose columns span many binades (every block sees a different magnitude)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(*spread, shape[-1])


def random_bits(shape, seed=0, dtype=torch.float32):
    """Random finite bit patterns: every exponent equally likely, float32 subnormals included (inf and NaN,
    and values that overflow in `dtype`, become 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = x.to(dtype)
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=dtype))


def edge_blocks(elem: str) -> torch.Tensor:
    """One block of 32 per row: zeros (both signs), a float32-subnormal block, a block of element subnormals
    under one large value, amax at and around max·2^k (the clipping edge), and exact ties of the element grid."""
    spec = floats.info(elem)
    v = floats.values(elem)
    pos = v[v > 0].repeat(5)[:31]  # E2M1 has 7 positive values: repeated to fill a block
    ties = ((v[v > 0][1:] + v[v > 0][:-1]) / 2).repeat(6)[:31]  # exact midpoints, scaled by the block's 2^X
    rows = [torch.zeros(32), -torch.zeros(32), torch.linspace(-1, 1, 32) * 1e-40,
            torch.cat([torch.tensor([2.0 ** mx.MX_EMAX[elem]]), pos * spec.smallest_subnormal])]
    for k in (-20, 0, 7):
        top = torch.tensor(spec.max * 2.0**k / 2.0 ** mx.MX_EMAX[elem])  # max·2^X for the block's X
        f32 = lambda v: torch.tensor(v, dtype=torch.float32)
        for a in (top, torch.nextafter(top, f32(0)), torch.nextafter(top, f32(math.inf)),
                  f32(2.0 ** (k + 1) * 0.999999), f32(2.0**k), f32(7 * 2.0**k / 4)):
            a = a.item()
            rows.append(torch.cat([torch.tensor([a, -a]), torch.linspace(-a, a, 30)]))
        rows.append(torch.cat([torch.tensor([2.0 ** mx.MX_EMAX[elem]]), ties]) * 2.0**k)
    return torch.stack([r[:32] for r in rows]).float()


@needs_torchao
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", mx.SCALE_RULES)
@pytest.mark.parametrize("elem", ELEMS)
def test_quantize_mx_matches_torchao_on_random_tensors(elem, rule, dtype):
    for x in (randn((64, 256)).to(dtype), random_bits((512, 64), seed=1, dtype=dtype)):
        assert_same_bits(mx.quantize_mx(x, elem, scale_rule=rule).dequantize(), mx.torchao_mx(x, elem, 32, rule))


@needs_torchao
@pytest.mark.parametrize("rule", mx.SCALE_RULES)
@pytest.mark.parametrize("elem", ELEMS)
def test_quantize_mx_matches_torchao_at_the_edges(elem, rule):
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import MXTensor

    for x in (edge_blocks(elem), edge_blocks(elem).to(torch.bfloat16)):
        ours = mx.quantize_mx(x, elem, scale_rule=rule)
        theirs = MXTensor.to_mx(x, TORCHAO_DTYPE[elem], 32, scaling_mode=ScaleCalculationMode(rule))
        same = (ours.scales == theirs.scale.view(torch.uint8)).flatten()  # (rows,): one block per row
        if rule == "rceil":  # only where amax / max lies just above 2^k (module docstring): torchao's X is k
            d = x.float().abs().amax(-1) / floats.info(elem).max
            k = theirs.scale.view(torch.uint8).flatten().to(torch.int32) - 127
            assert torch.equal(ours.scales.flatten()[~same].to(torch.int32) - 127, k[~same] + 1)
            assert (d[~same].double() / 2.0 ** k[~same].double() < 1 + 2**-20).all()
        else:
            assert same.all()
        assert_same_bits(ours.dequantize()[same], theirs.dequantize(x.dtype)[same])


@needs_torchao
@pytest.mark.parametrize("elem", ELEMS)
def test_codes_and_e8m0_scales_equal_torchaos(elem):
    from torchao.prototype.mx_formats.kernels import unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import MXTensor

    x = torch.cat([randn((32, 128), seed=2).reshape(-1, 32), edge_blocks(elem)])  # (rows, 32)
    ref = MXTensor.to_mx(x, TORCHAO_DTYPE[elem], 32)
    codes = ref.qdata.view(torch.uint8)
    codes = unpack_uint4(codes) if elem == "fp4_e2m1" else codes
    state = mx.quantize_mx(x, elem)
    assert torch.equal(state.codes, codes.reshape(x.shape))
    assert torch.equal(state.scales, ref.scale.view(torch.uint8))


@needs_torchao
@pytest.mark.parametrize("block_size", [16, 64])
def test_other_block_sizes_and_3d_tensors_match_torchao(block_size):
    x = randn((2, 8, 128), seed=3)
    assert_same_bits(mx.quantize_mx(x, "fp8_e4m3", block_size).dequantize(), mx.torchao_mx(x, "fp8_e4m3", block_size))


def test_shared_exponent_is_floor_log2_amax_minus_emax():
    amax = torch.tensor([1.0, 1.5, 5.9, 6.0, 7.9, 2.0**-30, 3e38, 0.0])
    for elem, emax in mx.MX_EMAX.items():
        expected = [math.floor(math.log2(a)) - emax if a > 0 else -127 for a in amax.tolist()]
        assert mx.shared_exponent(amax, elem).tolist() == [max(e, -127) for e in expected]
    # rceil: the smallest X with amax / 2^X <= max (E2M1: 6 -> 0, 6.5 -> 1, 3 -> -1)
    assert mx.shared_exponent(torch.tensor([6.0, 6.5, 3.0, 0.0]), "fp4_e2m1", "rceil").tolist() == [0, 1, -1, -127]


@pytest.mark.parametrize("elem, top", [("fp4_e2m1", 1.5), ("fp6_e2m3", 1.875), ("fp6_e3m2", 1.75),
                                       ("fp8_e4m3", 1.75), ("fp8_e5m2", 1.75)])
def test_floor_rule_clips_blocks_whose_max_lies_above_max_times_2_to_the_x(elem, top):
    # E2M1 (top 1.5): amax in (6·2^X, 8·2^X) is clipped; amax = 6·2^X is not; rceil and ceil never clip
    emax = mx.MX_EMAX[elem]
    for k in (-10, 0, 5):
        rel = torch.tensor([1.0, 1.25, top, top * (1 + 2**-20), (top + 2) / 2, 1.999])
        x = torch.cat([(rel * 2.0 ** (k + emax))[:, None], torch.zeros(6, 31)], dim=1)  # (6 blocks, 32)
        clipped = mx.mx_clipped(x, elem)
        assert clipped.flatten().tolist() == [False, False, False, True, True, True]
        # a clipped block's largest value comes back as max·2^X: saturated
        got = mx.quantize_mx(x, elem).dequantize()[:, 0]
        assert torch.equal(got[clipped.flatten()], torch.full((3,), floats.info(elem).max * 2.0**k))
        assert not mx.mx_clipped(x, elem, scale_rule="rceil").any() and not mx.mx_clipped(x, elem, scale_rule="ceil").any()


@needs_torchao
def test_rceil_reads_x_exactly_where_torchaos_float32_log2_rounds_down():
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import MXTensor

    # amax / 6 is the float32 just above 2^-5: ceil(log2) = -4, but float32 log2 returns exactly -5
    a = (1.5 + 2**-23) / 8  # the float32 after 0.1875
    x = torch.tensor([[a] + [0.01] * 31])
    assert (x[0, 0] / 6).item() > 2**-5 and torch.log2(x[0, 0] / 6).item() == -5
    ours = mx.quantize_mx(x, scale_rule="rceil")
    theirs = MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32, scaling_mode=ScaleCalculationMode.RCEIL)
    assert ours.scales.item() - 127 == -4 and theirs.scale.view(torch.uint8).item() - 127 == -5
    assert not mx.mx_clipped(x, scale_rule="rceil").any()  # ours: a / 2^-4 = 3.0000002 <= 6


@needs_torchao
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_tensor_scale", [True, False])
def test_quantize_nvfp4_matches_torchao(per_tensor_scale, dtype):
    for x in (randn((64, 256), seed=4).to(dtype), random_bits((64, 256), seed=5, dtype=dtype),
              edge_blocks("fp4_e2m1").to(dtype)):
        assert_same_bits(mx.quantize_nvfp4(x, per_tensor_scale).dequantize(), mx.torchao_nvfp4(x, per_tensor_scale))
    x3 = randn((2, 16, 64), seed=6).to(dtype)  # torchao also takes 3-D (experts, rows, columns)
    assert_same_bits(mx.quantize_nvfp4(x3, per_tensor_scale).dequantize(), mx.torchao_nvfp4(x3, per_tensor_scale))


@needs_torchao
def test_nvfp4_codes_scales_and_tensor_scale_equal_torchaos():
    from torchao.prototype.mx_formats.kernels import unpack_uint4
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    x = randn((32, 128), seed=7)
    t = per_tensor_amax_to_scale(x.abs().amax())
    ref = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=t)
    state = mx.quantize_nvfp4(x)
    assert state.tensor_scale.item() == t.item() == (x.abs().amax() / (448 * 6)).item()
    assert torch.equal(state.codes, unpack_uint4(ref.qdata).reshape(x.shape))
    assert torch.equal(state.scales, ref.scale.view(torch.uint8))


def test_nvfp4_on_zeros_gives_zeros_and_refuses_a_tensor_too_small_for_its_scale():
    # torchao divides by t = 0 here and returns NaN (module docstring); qlearn returns the zeros
    z = torch.zeros(4, 32)
    assert torch.equal(mx.quantize_nvfp4(z).dequantize(), z)
    with pytest.raises(ValueError, match="too small for a tensor scale"):
        mx.quantize_nvfp4(torch.full((2, 16), 1e-37))
    assert torch.equal(mx.quantize_nvfp4(torch.full((2, 16), 1e-37), False).dequantize(), torch.zeros(2, 16))


def test_nvfp4_beats_mxfp4_on_a_block_between_two_powers_of_two():
    # amax 7: MXFP4's X = 0 saturates 7 to 6; NVFP4's real scale 7/6 (rounded to E4M3) keeps it
    x = torch.tensor([[7.0, 3.5, 1.0, 0.4] * 8])
    mx_err = (mx.quantize_mx(x).dequantize() - x).abs().max().item()
    nv_err = (mx.quantize_nvfp4(x[:, :16], False).dequantize() - x[:, :16]).abs().max().item()
    assert mx_err == 1.0 and nv_err < 0.3


def test_state_protocol_bits_shape_dtype_and_repr():
    x = randn((4, 64), seed=8).to(torch.bfloat16)
    for elem, bpp in [("fp4_e2m1", 4.25), ("fp6_e2m3", 6.25), ("fp6_e3m2", 6.25), ("fp8_e4m3", 8.25), ("fp8_e5m2", 8.25)]:
        s = mx.quantize_mx(x, elem)
        assert s.bits_per_param() == bpp and s.storage_bits() == 256 * (bpp - 0.25) + 8 * 8
        assert s.codes.dtype == torch.uint8 and s.scales.shape == (4, 2)
        assert s.dequantize().dtype == torch.bfloat16 and s.dequantize(torch.float32).shape == (4, 64)
    nv = mx.quantize_nvfp4(x)
    assert nv.bits_per_param() == 4 + 8 / 16 + 32 / 256 and mx.quantize_nvfp4(x, False).bits_per_param() == 4.5
    assert repr(mx.quantize_mx(x)) == ("MXState(bits=4, blocks of 32, e8m0 scales, shape=(4, 64), dtype=torch.bfloat16, "
                                       "elem='fp4_e2m1', scale_rule='floor', bits_per_param=4.25)")
    assert "fp8_e4m3 scales + fp32 tensor scale" in repr(nv)
    # the E8M0 code is X + 127, and -0.0 keeps its sign
    s = mx.quantize_mx(torch.tensor([[-0.0] * 31 + [6.0]]))
    assert s.scales.item() == 127 and torch.signbit(s.dequantize()[0, 0]) and s.dequantize()[0, -1] == 6.0


@needs_torchao
@pytest.mark.parametrize("elem", ["fp6_e2m3", "fp6_e3m2", "fp4_e2m1"])
def test_floats_round_to_and_decode_match_torchaos_sub_byte_casts(elem):
    from torchao.prototype.custom_fp_utils import _f32_to_floatx_unpacked, _floatx_unpacked_to_f32

    spec = floats.info(elem)
    x = torch.cat([random_bits((200_000,), seed=9), randn((1, 100_000), seed=10, spread=(-4, 2)).flatten()])
    x = torch.cat([x, floats.values(elem) * (1 + 2**-20), floats.values(elem)])  # grid points and just above
    v = floats.values(elem)
    x = torch.cat([x, (v[1:] + v[:-1]) / 2])  # exact ties
    codes = _f32_to_floatx_unpacked(x, spec.exponent_bits, spec.mantissa_bits)
    assert torch.equal(floats.encode(x, elem), codes.to(torch.int64))
    every = torch.arange(2**spec.bits, dtype=torch.uint8)
    assert_same_bits(floats.decode(every, elem), _floatx_unpacked_to_f32(every, spec.exponent_bits, spec.mantissa_bits))


def test_fp6_formats_in_floats():
    e2m3, e3m2 = floats.info("fp6_e2m3"), floats.info("fp6_e3m2")
    assert (e2m3.max, e2m3.bias, e2m3.smallest_normal, e2m3.smallest_subnormal) == (7.5, 1, 1.0, 0.125)
    assert (e3m2.max, e3m2.bias, e3m2.smallest_normal, e3m2.smallest_subnormal) == (28.0, 3, 0.25, 0.0625)
    assert floats.values("fp6_e2m3").numel() == 63 and floats.values("fp6_e3m2").numel() == 63
    assert floats.round_to(torch.tensor([8.0, 29.0, -1e9]), "fp6_e3m2").tolist() == [8.0, 28.0, -28.0]
    assert "fp6_e2m3" not in floats.FLOAT_FORMATS  # notebook 01's table lists FLOAT_FORMATS
    with pytest.raises(ValueError, match="x contains NaN, which fp6_e2m3 cannot represent"):
        floats.round_to(torch.tensor([math.nan]), "fp6_e2m3")


@pytest.mark.parametrize("call, error, match", [
    (lambda: mx.quantize_mx(torch.ones(32), "fp5"), ValueError, r"elem must be one of \('fp4_e2m1'.*got 'fp5'"),
    (lambda: mx.quantize_mx(torch.ones(4, 48)), ValueError, r"block_size must divide the last dimension of x \(shape \(4, 48\)\), got 32"),
    (lambda: mx.quantize_mx(torch.ones(32), block_size=0), ValueError, "block_size must be a positive int, got 0"),
    (lambda: mx.quantize_mx(torch.ones(()), block_size=1), ValueError, "block_size must divide the last dimension"),
    (lambda: mx.quantize_mx(torch.ones(32, dtype=torch.int32)), TypeError, "x must have a floating-point dtype.*got torch.int32"),
    (lambda: mx.quantize_mx([1.0] * 32), TypeError, "x must be a floating-point torch.Tensor, got list"),
    (lambda: mx.quantize_mx(torch.tensor([math.nan] + [1.0] * 31)), ValueError, "x contains NaN or inf"),
    (lambda: mx.quantize_nvfp4(torch.tensor([math.inf] + [1.0] * 15)), ValueError, "x contains NaN or inf"),
    (lambda: mx.quantize_mx(torch.ones(32), scale_rule="round"), ValueError, r"scale_rule must be one of \('floor'"),
    (lambda: mx.quantize_nvfp4(torch.ones(16), -1.0), ValueError, "per_tensor_scale must be True, False or a positive"),
    (lambda: mx.quantize_nvfp4(torch.ones(24)), ValueError, "block_size must divide the last dimension of x"),
    (lambda: mx.mx_clipped(torch.ones(32), "int4"), ValueError, "elem must be one of"),
])
def test_bad_input_raises_errors_naming_the_parameter(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_mx_imports_and_runs_without_torchao():
    code = ("import sys; sys.modules['torchao'] = None\n"  # any import of torchao now fails
            "from qlearn.formats import mx\n"
            "import torch\n"
            "assert not mx.torchao_available()\n"
            "assert mx.quantize_mx(torch.ones(2, 32)).dequantize().eq(1).all()\n"
            "try:\n    mx.torchao_mx(torch.ones(2, 32))\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "torchao is not installed" in out.stdout
