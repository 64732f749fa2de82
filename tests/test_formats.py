"""qlearn.formats against torch's own casts, bit for bit (torch 2.13's CPU casts are the reference)."""

import math

import pytest
import torch

from qlearn import formats as F

TORCH_FORMATS = ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"]  # formats torch can cast to


def torch_round(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return x.to(F.info(fmt).torch_dtype).float()


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor):
    """Equal as float32 bit patterns (so -0.0 != +0.0), any NaN equal to any NaN."""
    assert got.dtype == torch.float32 and got.shape == expected.shape
    same = (got.view(torch.int32) == expected.view(torch.int32)) | (got.isnan() & expected.isnan())
    if not same.all():
        i = (~same).nonzero()[:5].flatten()
        pytest.fail(f"{int((~same).sum())} differ, e.g. {expected.flatten()[i].tolist()} expected, "
                    f"{got.flatten()[i].tolist()} got")


def all_float16() -> torch.Tensor:
    return torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()


def all_bfloat16() -> torch.Tensor:
    return torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()


def random_float32(n: int = 1_000_000, seed: int = 0) -> torch.Tensor:
    """Random bit patterns: every exponent (subnormals, inf, NaN included) equally likely."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(
        torch.float32)


def midpoints(v: torch.Tensor) -> torch.Tensor:
    """Exact ties between neighbouring finite values (float64 midpoints of float32 values fit in float32
    for every format here: they need one more mantissa bit than the format has)."""
    v = torch.unique(v[torch.isfinite(v)]).double()
    mid = ((v[1:] + v[:-1]) / 2).float()
    assert torch.equal(mid.double(), (v[1:] + v[:-1]) / 2)  # the ties really are exact in float32
    return mid


def with_neighbours(x: torch.Tensor) -> torch.Tensor:
    """x and the float32 values just below and just above it."""
    return torch.cat([x, torch.nextafter(x, torch.full_like(x, -math.inf)),
                      torch.nextafter(x, torch.full_like(x, math.inf))])


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_round_to_matches_torch_on_every_float16_pattern(fmt):
    x = all_float16()  # subnormals, both zeros, infs and NaNs included
    assert_same_bits(F.round_to(x, fmt), torch_round(x, fmt))


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_round_to_matches_torch_on_every_bfloat16_pattern(fmt):
    x = all_bfloat16()  # the full float32 exponent range, float32 subnormals included
    assert_same_bits(F.round_to(x, fmt), torch_round(x, fmt))


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_round_to_matches_torch_on_random_float32_bit_patterns(fmt):
    x = random_float32()
    assert_same_bits(F.round_to(x, fmt), torch_round(x, fmt))


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_round_to_matches_torch_on_random_normal_values(fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, generator=g) * torch.logspace(-8, 6, 200_000)  # many binades, both signs
    assert_same_bits(F.round_to(x, fmt), torch_round(x, fmt))


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_round_to_matches_torch_on_ties_and_their_neighbours(fmt):
    grid = {"fp16": all_float16(), "bf16": all_bfloat16()}.get(fmt)
    grid = F.values(fmt) if grid is None else grid
    ties = with_neighbours(midpoints(grid))
    ties = torch.cat([ties, -ties])
    assert_same_bits(F.round_to(ties, fmt), torch_round(ties, fmt))


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_round_to_matches_torch_at_every_boundary(fmt):
    i = F.info(fmt)
    ulp_at_max = i.eps * 2.0 ** math.floor(math.log2(i.max))
    edges = torch.tensor([i.max, i.max + ulp_at_max / 2, i.max + ulp_at_max, 2 * i.max, 1e30,
                          i.smallest_normal, i.smallest_subnormal, i.smallest_subnormal / 2,
                          i.smallest_subnormal * 1.5, i.smallest_normal - i.smallest_subnormal / 2,
                          1.0, 1 + i.eps / 2, 1 + i.eps, torch.finfo(torch.float32).max,
                          torch.finfo(torch.float32).tiny, 1e-45, 0.0, math.inf, math.nan],
                         dtype=torch.float32)
    edges = with_neighbours(edges)
    edges = torch.cat([edges, -edges])
    assert_same_bits(F.round_to(edges, fmt), torch_round(edges, fmt))


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_round_to_float64_input_rounds_through_float32_like_torch(fmt):
    # 1 + 2^-11 + 2^-40 is just above an fp16 tie; torch (and round_to) go through float32 first,
    # where it becomes the tie, which then rounds to even: 1.0.
    x = torch.tensor([1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-40, 1 + 2**-4 + 2**-40], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.cat([x, torch.randn(10_000, generator=g, dtype=torch.float64)])
    assert_same_bits(F.round_to(x, fmt), x.to(F.info(fmt).torch_dtype).float())


def test_documented_out_of_range_behaviour():
    r = F.round_to
    t = torch.tensor
    assert r(t([65519.0, 65520.0, -1e5]), "fp16").tolist() == [65504.0, math.inf, -math.inf]
    bf = r(t([1e5, 3e38]), "bf16")  # bf16 has fp32's range: no overflow, only 8 bits of precision
    assert bf[0].item() == 99840.0 and abs(bf[1].item() / 3e38 - 1) <= 2**-8
    assert r(t([57344.0, 61439.0, 61440.0]), "fp8_e5m2").tolist() == [57344.0, 57344.0, math.inf]
    # torch 2.13's E4M3 cast saturates (older releases gave NaN): 464 is a tie that would round up to
    # the NaN pattern, 1e6 and inf are far out; all become 448.
    assert r(t([463.0, 464.0, 1e6, math.inf, -math.inf]), "fp8_e4m3").tolist() == [448.0] * 4 + [-448.0]
    assert torch.isnan(r(t([math.nan]), "fp8_e4m3")).all()
    assert r(t([5.0, 5.01, 7.0, 1e9, math.inf, -math.inf]), "fp4_e2m1").tolist() == [4, 6, 6, 6, 6, -6]


def test_fp4_e2m1_rounds_to_the_nearest_magnitude_ties_to_even():
    v = F.values("fp4_e2m1")
    assert v.tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    x = all_float16()
    x = x[torch.isfinite(x) & (x.abs() <= 6)]
    # reference by brute force: the nearest value; at a tie the one whose bit pattern is even
    codes = torch.arange(16)
    vals = F.decode(codes, "fp4_e2m1")
    dist = (x[:, None] - vals[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    tie_break = torch.where(dist == best, (codes % 2).float(), math.inf)  # even mantissa bit wins
    expected = vals[tie_break.argmin(dim=1)].abs() * torch.where(torch.signbit(x), -1.0, 1.0)
    assert_same_bits(F.round_to(x, "fp4_e2m1"), expected)
    assert F.round_to(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]), "fp4_e2m1").tolist() == [
        0, 1, 1, 2, 2, 4, 4]


@pytest.mark.parametrize("fmt", F.FLOAT_FORMATS)
def test_round_to_keeps_signed_zero_shape_and_leaves_input_alone(fmt):
    x = torch.tensor([[-0.0, 0.0], [-1e-30, 1e-30]])
    before = x.clone()
    y = F.round_to(x, fmt)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.equal(x, before)
    assert torch.signbit(y).tolist() == [[True, False], [True, False]]
    assert y is not x


def test_round_to_fp32_is_the_identity_on_float32():
    x = random_float32(10_000)
    assert_same_bits(F.round_to(x, "fp32"), x)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_values_are_fixed_points_of_round_to(fmt):
    v = F.values(fmt)
    assert torch.equal(F.round_to(v, fmt), v)
    assert torch.all(v[1:] > v[:-1])  # sorted, no duplicates


@pytest.mark.parametrize("fmt", TORCH_FORMATS[2:])
def test_values_equal_torch_float8_bit_patterns(fmt):
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(F.info(fmt).torch_dtype).float()
    assert torch.equal(F.values(fmt), torch.unique(every[torch.isfinite(every)]))


def test_values_counts_and_integer_grids():
    counts = {f: F.values(f).numel() for f in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "int8", "int4")}
    # e4m3: 256 patterns - 2 NaN - one duplicate zero; e5m2: - 2 inf - 6 NaN - one zero
    assert counts == {"fp8_e4m3": 253, "fp8_e5m2": 247, "fp4_e2m1": 15, "int8": 256, "int4": 16}
    assert F.values("int4").tolist() == list(range(-8, 8))


@pytest.mark.parametrize("fmt", TORCH_FORMATS + ["fp32"])
def test_info_matches_torch_finfo(fmt):
    i, fi = F.info(fmt), torch.finfo(F.info(fmt).torch_dtype)
    assert (i.max, i.min, i.eps, i.smallest_normal, i.bits) == (fi.max, fi.min, fi.eps, fi.tiny, fi.bits)
    assert i.smallest_subnormal == i.smallest_normal * i.eps
    if i.bits <= 16:  # and max is the largest value any finite bit pattern decodes to
        v = F.decode(torch.arange(2**i.bits), fmt)
        assert v[torch.isfinite(v)].max().item() == i.max


def test_info_of_fp4_and_integer_formats():
    i = F.info("fp4_e2m1")
    assert (i.max, i.smallest_normal, i.smallest_subnormal, i.eps, i.bias) == (6.0, 1.0, 0.5, 0.5, 1)
    assert not i.has_inf and not i.has_nan and i.overflow == "saturate" and i.bytes_per_param == 0.5
    i8 = F.info("int8")
    assert (i8.min, i8.max) == (torch.iinfo(torch.int8).min, torch.iinfo(torch.int8).max)
    assert (F.info("int4").min, F.info("int4").max, F.info("int4").bits) == (-8, 7, 4)
    assert not i8.is_float and i8.exponent_bits is None and F.info("fp16").is_float


def test_info_overflow_policy():
    assert {f: F.info(f).overflow for f in F.FLOAT_FORMATS} == {
        "fp32": "inf", "fp16": "inf", "bf16": "inf", "fp8_e4m3": "saturate", "fp8_e5m2": "inf",
        "fp4_e2m1": "saturate"}


@pytest.mark.parametrize("fmt,view", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                      ("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_decode_matches_torch_view_of_every_bit_pattern(fmt, view):
    n = F.info(fmt).bits
    codes = torch.arange(2**n)
    int_dtype = torch.int16 if n == 16 else torch.uint8
    expected = codes.to(torch.int32).to(int_dtype).view(view).float()
    assert_same_bits(F.decode(codes, fmt), expected)


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_encode_gives_torchs_bit_patterns(fmt):
    x = torch.cat([all_float16(), random_float32(100_000, seed=3)])
    x = x[~x.isnan()]  # NaN payloads differ between casts; NaN is tested below
    n = F.info(fmt).bits
    raw = x.to(F.info(fmt).torch_dtype).view(torch.int16 if n == 16 else torch.uint8).to(torch.int64)
    assert torch.equal(F.encode(x, fmt), raw % 2**n)


def test_encode_decode_round_trip_and_nan_patterns():
    for fmt in F.FLOAT_FORMATS:
        x = random_float32(20_000, seed=4)
        x = x[torch.isfinite(x)] if fmt == "fp4_e2m1" else x
        assert_same_bits(F.decode(F.encode(x, fmt), fmt), F.round_to(x, fmt))
    assert int(F.encode(math.nan, "fp16")) == 0x7E00 and int(F.encode(math.nan, "fp8_e4m3")) == 0x7F


def test_bits_fields_of_known_values():
    one = F.bits(1.0, "fp16")
    assert (one.sign, one.exponent, one.mantissa, one.code, one.binary, one.kind) == (
        0, 15, 0, 0x3C00, "0 01111 0000000000", "normal")
    b = F.bits(-2.5, "bf16")  # -1.25 * 2^1: exponent field 128, mantissa 0.25 * 128 = 32
    assert (b.sign, b.exponent, b.mantissa, b.value, b.code) == (1, 128, 32, -2.5, 0xC020)
    assert b.formula() == "-(1 + 32/128) * 2^(128 - 127)" and str(b).startswith("bf16: 1 10000000 0100000")
    sub = F.bits(2**-24, "fp16")
    assert (sub.exponent, sub.mantissa, sub.kind, sub.formula()) == (0, 1, "subnormal", "+(0 + 1/1024) * 2^(1 - 15)")
    assert F.bits(1e5, "fp16").kind == "inf" and F.bits(1e5, "fp8_e4m3").value == 448.0
    assert F.bits(-0.0, "fp8_e5m2").kind == "zero" and F.bits(-0.0, "fp8_e5m2").sign == 1
    assert F.bits(math.nan, "fp8_e4m3").binary == "0 1111 111" and F.bits(math.nan, "fp32").kind == "nan"
    assert F.bits(torch.tensor([0.1]), "fp4_e2m1").value == 0.0
    assert F.bits(0.1, "fp32").code == torch.tensor(0.1).view(torch.int32).item()


def test_bad_input_raises_errors_naming_the_parameter():
    with pytest.raises(ValueError, match=r"fmt must be one of \('fp32', 'fp16'.*got 'fp12'"):
        F.round_to(torch.ones(2), "fp12")
    with pytest.raises(ValueError, match="integer formats need a scale"):
        F.round_to(torch.ones(2), "int8")
    with pytest.raises(ValueError, match=r"fmt must be one of .*got 'float16'"):
        F.info("float16")
    with pytest.raises(TypeError, match="x must have a floating-point dtype .*got torch.int64"):
        F.round_to(torch.arange(3), "fp16")
    with pytest.raises(TypeError, match="x must be a floating-point torch.Tensor or a Python number, got str"):
        F.round_to("1.0", "fp16")
    with pytest.raises(TypeError, match="x must be"):
        F.round_to(True, "fp16")
    with pytest.raises(ValueError, match="x contains NaN, which fp4_e2m1 cannot represent"):
        F.round_to(torch.tensor([1.0, math.nan]), "fp4_e2m1")
    with pytest.raises(ValueError, match=r"formats of at most 8 bits.*got 'fp16'"):
        F.values("fp16")
    with pytest.raises(ValueError, match=r"code must be in 0..255 for fp8_e4m3"):
        F.decode(256, "fp8_e4m3")
    with pytest.raises(TypeError, match="code must be an int or an integer tensor"):
        F.decode(torch.tensor([1.0]), "fp16")
    with pytest.raises(ValueError, match=r"x must hold a single value, got shape \(2,\)"):
        F.bits(torch.ones(2), "fp16")
    with pytest.raises(ValueError, match="fmt must be one of"):
        F.bits(1.0, "int4")
