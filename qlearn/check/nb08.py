"""Checkers for notebook 08 (merging).

8.1 bf16_half_spacing(fn): fn(x float32 Tensor) -> float32 Tensor, half the gap between the two bf16
                           numbers around |x|: the most that rounding x to bf16 can move it
8.2 codes_moved(fn):       fn(w_hat, delta, blocksize) -> fraction (0..1) of NF4 codes that change when
                           delta is merged into the 4-bit weight w_hat and the sum is re-quantized
8.3 combine_cat(fn):       fn(As, Bs, scalings, weights) -> (A', B') with B' A' = sum_i w_i s_i B_i A_i
                           (peft's add_weighted_adapter, combination_type="cat")
8.4 fold_shift(fn):        fn(zero_point, scale, shift) -> z' = z - D / scale, the zero points that make
                           scale (q - z') = scale (q - z) + D (QA-LoRA's merge, qlearn.qalora)
"""

from __future__ import annotations

import torch

from . import CheckResult, exercise

__all__ = ["bf16_half_spacing", "codes_moved", "combine_cat", "fold_shift"]

# (x, half spacing): bf16 keeps 7 explicit mantissa bits, so between 2^e and 2^(e+1) its numbers are
# 2^(e-7) apart and rounding to nearest moves x by at most half of that, 2^(e-8), e = floor(log2 |x|).
_SPACING_CASES = [
    (1.0, 2.0**-8),       # spacing above 1 is 2^-7 = 0.0078
    (1.5, 2.0**-8),
    (0.75, 2.0**-9),      # below 1 the spacing halves
    (-3.0, 2.0**-7),      # the sign does not matter
    (0.01, 2.0**-15),     # 2^-7 <= 0.01 < 2^-6: e = -7
    (1000.0, 2.0**1),     # 512 <= 1000 < 1024: spacing 4, half 2
    (0.0234375, 2.0**-14),  # 3 * 2^-7, e = -6
]


def bf16_half_spacing(fn) -> CheckResult:
    """Exercise 8.1: 2^(floor(log2 |x|) - 8), the bound on |bf16(x) - x|."""
    with exercise("8.1", "how far bf16 rounding can move a weight") as ex:
        x = torch.tensor([c[0] for c in _SPACING_CASES])
        expected = torch.tensor([c[1] for c in _SPACING_CASES])
        got = fn(x.clone())
        ex.tensor_like(got, expected, "the half spacing", hint="return one value per element of x")
        got = got.float()
        if torch.allclose(got, 2 * expected, rtol=0, atol=0):
            ex.fail("you returned the whole spacing between neighbouring bf16 numbers",
                    hint="rounding to the NEAREST number moves x by at most half the spacing: 2^(e-8)")
        if torch.allclose(got, expected / 8, rtol=0, atol=0):
            ex.fail("you used float16's 10 mantissa bits", hint="bf16 keeps 7 explicit mantissa bits (fp32's range)")
        # exact: every answer is a power of two
        ex.close(got, expected, f"half spacing at x = {[c[0] for c in _SPACING_CASES]}", atol=0, rtol=0,
                 hint="e = floor(log2(|x|)); the bf16 numbers in [2^e, 2^(e+1)) are 2^(e-7) apart; return 2^(e-8)")
        g = torch.Generator().manual_seed(7)
        w = torch.randn(1000, generator=g) * 0.05  # weight-sized values: the bound must hold for each
        err = (w.to(torch.bfloat16).float() - w).abs()
        bound = fn(w.clone()).float()
        ex.true(bool((err <= bound).all()), "for random weights, |bf16(w) - w| exceeds your bound somewhere",
                hint="2^(floor(log2 |w|) - 8) for each element")
    return ex.result


def _moved(w_hat: torch.Tensor, delta: torch.Tensor, blocksize: int) -> float:
    from qlearn.merging import requantize

    return 1.0 - requantize(w_hat, delta, blocksize).unchanged


def _w_hat(g: torch.Generator, shape: tuple[int, ...], blocksize: int) -> torch.Tensor:
    """A weight as a 4-bit layer computes with: dequantize(quantize(w))."""
    from qlearn.quant import nf4

    return nf4.quantize_nf4(torch.randn(shape, generator=g) * 0.02, blocksize).dequantize()


def _cases() -> list[tuple[torch.Tensor, torch.Tensor, int, str]]:
    g = torch.Generator().manual_seed(3)
    cases = []
    for shape, blocksize, scale, what in [((4, 64), 64, 2e-3, "a (4, 64) weight, a mid-sized update"),
                                          ((8, 128), 64, 1e-4, "a (8, 128) weight, a tiny update"),
                                          ((2, 256), 128, 5e-3, "a (2, 256) weight in blocks of 128")]:
        w_hat = _w_hat(g, shape, blocksize)
        cases.append((w_hat, torch.randn(shape, generator=g) * scale, blocksize, what))
    # a block whose largest weight grows: its absmax changes, so codes move all over the block
    w_hat = _w_hat(g, (1, 64), 64)
    delta = torch.zeros(1, 64)
    delta.view(-1)[int(w_hat.abs().argmax())] = w_hat.abs().max() * 0.5 * w_hat.view(-1)[int(w_hat.abs().argmax())].sign()
    cases.append((w_hat, delta, 64, "one weight grows the block's absmax by 50%"))
    return cases


def _moved_keeping_absmax(w_hat: torch.Tensor, delta: torch.Tensor, blocksize: int) -> float:
    """The usual mistake: re-quantize with the OLD block scales."""
    from qlearn.quant import nf4

    state = nf4.quantize_nf4(w_hat, blocksize)
    codes, absmax = state.codes, state.absmax
    table = nf4.codebook()
    blocks = (w_hat + delta).reshape(-1, blocksize) / absmax.unsqueeze(1)  # (n_blocks, blocksize)
    mid = (table[:-1] + table[1:]) / 2
    after = torch.bucketize(blocks.clamp(-1, 1), mid).reshape(w_hat.shape)
    return (after != codes.long()).double().mean().item()


def codes_moved(fn) -> CheckResult:
    """Exercise 8.2: the fraction of 4-bit codes a merge changes (peft's Linear4bit.merge re-quantizes)."""
    with exercise("8.2", "fraction of NF4 codes a merge moves") as ex:
        for w_hat, delta, blocksize, what in _cases():
            got = fn(w_hat.clone(), delta.clone(), blocksize)
            expected = _moved(w_hat, delta, blocksize)
            try:
                g = float(got)
            except (TypeError, ValueError):
                ex.fail(f"{what}: expected a number, got {type(got).__name__}", hint="return a float in 0..1")
            if expected != 0.5 and abs(g - (1.0 - expected)) < 1e-9:
                ex.fail(f"{what}: expected {expected:.6g}, got {g:.6g}, the fraction that did NOT move",
                        hint="count codes_before != codes_after")
            if abs(g - _moved_keeping_absmax(w_hat, delta, blocksize)) < 1e-9 and abs(g - expected) > 1e-9:
                ex.fail(f"{what}: expected {expected:.6g}, got {g:.6g}, as if the old block scales were kept",
                        hint="re-quantizing computes a NEW absmax per block of W_hat + delta "
                             "(qlearn.quant.nf4.quantize_nf4 does it all)")
            # exact: a count of equal integer codes over a fixed number of elements
            ex.close(g, expected, what, atol=1e-12, rtol=0,
                     hint="codes_before = quantize_nf4(w_hat, blocksize).codes; codes_after = "
                          "quantize_nf4(w_hat + delta, blocksize).codes; return the mean of codes_before != codes_after")
    return ex.result


def _adapters(seed: int, ranks: list[int], d_in: int = 6, d_out: int = 5):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, d_in, generator=g) for r in ranks]
    Bs = [torch.randn(d_out, r, generator=g) for r in ranks]
    return As, Bs


def combine_cat(fn) -> CheckResult:
    """Exercise 8.3: one adapter holding the weighted sum of several, exactly ("cat")."""
    from qlearn.merging import combine_adapters

    cases = [([2, 2], [2.0, 1.0], [1.0, 1.0], "two rank-2 adapters, scalings 2 and 1, weights 1 and 1"),
             ([2, 3], [2.0, 0.5], [0.7, 0.3], "ranks 2 and 3, weights 0.7 and 0.3"),
             ([1, 2, 1], [1.0, 2.0, 4.0], [0.5, -1.0, 0.25], "three adapters, one with a negative weight")]
    with exercise("8.3", "combine adapters by concatenation") as ex:
        for seed, (ranks, scalings, weights, what) in enumerate(cases):
            As, Bs = _adapters(seed, ranks)
            got = fn([A.clone() for A in As], [B.clone() for B in Bs], list(scalings), list(weights))
            if not (isinstance(got, tuple) and len(got) == 2):
                ex.fail(f"{what}: expected a tuple (A, B), got {type(got).__name__}", hint="return A, B")
            A, B = got
            exp_A, exp_B = combine_adapters(As, Bs, scalings, weights, "cat")
            ex.tensor_like(A, exp_A, f"{what}: A'",
                           hint=f"stack the A_i along the rank dimension (dim 0): ({sum(ranks)}, in)")
            ex.tensor_like(B, exp_B, f"{what}: B'",
                           hint=f"concatenate the B_i along the rank dimension (dim 1): (out, {sum(ranks)})")
            exact = sum(w * s * B_i @ A_i for A_i, B_i, s, w in zip(As, Bs, scalings, weights))
            got_delta = B.float() @ A.float()
            if any(w != 1.0 for w in weights) and torch.allclose(
                    got_delta, sum(w * w * s * B_i @ A_i for A_i, B_i, s, w in zip(As, Bs, scalings, weights)),
                    atol=1e-4):
                ex.fail(f"{what}: the weights come out squared",
                        hint="put w_i * s_i on ONE side (peft: on A), not on both A and B")
            if any(s != 1.0 for s in scalings) and torch.allclose(
                    got_delta, sum(w * B_i @ A_i for A_i, B_i, w in zip(As, Bs, weights)), atol=1e-4):
                ex.fail(f"{what}: each adapter's scaling alpha / r is missing",
                        hint="the new adapter has scaling 1, so fold s_i into A_i: w_i * s_i * A_i")
            # float32 products of a few terms, summed in another order: 1e-4 on values of size ~10
            ex.close(got_delta, exact, f"{what}: B' A'", atol=1e-4, rtol=1e-5,
                     hint="A' = cat([w_i * s_i * A_i], dim=0), B' = cat([B_i], dim=1)")
            ex.close(A.float(), exp_A, f"{what}: A' (peft's layout)", atol=1e-6, rtol=1e-6,
                     hint="peft scales A (w_i * s_i * A_i) and leaves each B_i as it is")
    return ex.result


def fold_shift(fn) -> CheckResult:
    """Exercise 8.4: fold a per-group weight shift D into asymmetric zero points, z' = z - D / scale."""
    g = torch.Generator().manual_seed(11)
    out, groups = 6, 4
    q = torch.randint(0, 16, (out, groups, 8), generator=g).float()  # 4-bit codes, groups of 8
    scale = torch.rand(out, groups, 1, generator=g) * 0.05 + 0.01
    z = torch.randint(0, 16, (out, groups, 1), generator=g).float()
    shift = torch.randn(out, groups, 1, generator=g) * 0.01  # D, one value per (row, group)
    expected = z - shift / scale
    with exercise("8.4", "fold a pooled update into the zero points") as ex:
        got = fn(z.clone(), scale.clone(), shift.clone())
        ex.tensor_like(got, expected, "the new zero points", hint="one zero point per (row, group): z - D / scale")
        got = got.float()
        if torch.allclose(got, z + shift / scale, atol=1e-6):
            ex.fail("the shift has the wrong sign: your weights move by -D",
                    hint="W_hat = scale (q - z): raising z LOWERS the weights, so subtract D / scale")
        if torch.allclose(got, z - shift, atol=1e-6):
            ex.fail("D is in weight units, the zero point in grid steps",
                    hint="divide the shift by the group's scale: z - D / scale")
        if torch.equal(got, torch.round(got)) and not torch.equal(expected, torch.round(expected)):
            ex.fail("your zero points are whole numbers: the shift is rounded away",
                    hint="keep z' as a float (QA-LoRA's merge keeps float zero points)")
        # float32: one division and one subtraction on values of size ~16
        ex.close(got, expected, "z' for a (6, 4) grid of groups", atol=1e-5, rtol=0,
                 hint="return zero_point - shift / scale")
        merged = scale * (q - got)
        ex.close(merged, scale * (q - z) + shift, "scale (q - z') against W_hat + D", atol=1e-6, rtol=0,
                 hint="z' = z - D / scale makes scale (q - z') = scale (q - z) + D")
    return ex.result
