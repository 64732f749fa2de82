"""Checkers for notebook 04 (outlier features). Tests: tests/test_check_nb04.py.

4.1 per_token_int8(fn):      fn(x) -> (codes int8 of x's shape, scales float32 (tokens, 1)), s_t = max_j |x_tj| / 127
4.2 outlier_features(fn):    fn(x, threshold) -> sorted indices j with |x_tj| >= threshold in some row t (LLM.int8's O)
4.3 smoothing_factor(fn):    fn(act_absmax, weight, alpha) -> s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
"""

from __future__ import annotations

import torch

from . import CheckResult, exercise

__all__ = ["outlier_features", "per_token_int8", "smoothing_factor"]


def per_token_int8(fn) -> CheckResult:
    """Exercise 4.1: symmetric int8 with one absmax scale per token (row), dynamic."""
    cases = [
        torch.tensor([[0.5, -1.27, 0.02, 0.3], [60.0, 0.1, -0.2, 0.05]]),  # token 1 carries an outlier
        torch.tensor([[[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], [[3.0, 0.1, -0.7], [0.2, 0.4, -0.1]]]),  # 3-D, a zero row
    ]
    with exercise("4.1", "per-token int8 scales and codes") as ex:
        for x in cases:
            got = fn(x.clone())
            ex.true(isinstance(got, tuple) and len(got) == 2, "return a tuple (codes, scales)")
            codes, scales = got
            absmax = x.abs().amax(dim=-1, keepdim=True)
            expected_scales = (absmax / 127).clamp(min=1e-8)
            expected_codes = torch.round(x / expected_scales).clamp(-127, 127).to(torch.int8)
            ex.tensor_like(scales, expected_scales, f"scales for x of shape {tuple(x.shape)}",
                           hint="one scale per token: x.abs().amax(dim=-1, keepdim=True) / 127 (keepdim, so it "
                                "broadcasts against x)" if scales.numel() != 1 else
                           "that is one scale for the whole tensor (per-tensor): take the max over the last "
                           "dimension only, keepdim=True")
            nonzero = absmax.flatten() > 0
            # 1e-6 relative: a division by 127 in float32 rounds once either way
            ex.close(scales.flatten()[nonzero], expected_scales.flatten()[nonzero], "the scales (non-zero tokens)",
                     atol=0, rtol=1e-6, hint="s_t = max_j |x_tj| / 127 (127 = 2^7 - 1, not 128 or 255)")
            ex.true(bool((scales > 0).all()), "a scale is 0 (or NaN): an all-zero token",
                    hint="an all-zero token must give codes 0: clamp its scale above 0, e.g. .clamp(min=1e-8), "
                         "instead of dividing 0 by 0")
            ex.tensor_like(codes, expected_codes, "codes", hint="codes have x's shape")
            ex.true(codes.dtype == torch.int8, f"codes should be torch.int8, got {codes.dtype}",
                    hint="finish with .to(torch.int8)")
            ex.equal(codes, expected_codes, "codes",
                     hint="codes = round(x / s_t), clamped to [-127, 127]; an all-zero token must give codes 0 "
                          "(clamp its scale above 0, e.g. .clamp(min=1e-8), instead of dividing 0 by 0)")
    return ex.result


def outlier_features(fn) -> CheckResult:
    """Exercise 4.2: LLM.int8's outlier features, the columns with |x| >= threshold in any row."""
    x = torch.tensor([[0.5, -6.5, 0.1, 2.0, 6.0],
                      [7.0, 0.2, -0.3, 1.0, 0.1],
                      [0.1, -8.0, 0.2, -5.9, 0.4]])
    cases = [(x, 6.0), (x, 7.5), (x.reshape(1, 3, 5), 1.5), (x, 100.0)]
    with exercise("4.2", "count the outlier features") as ex:
        for inp, threshold in cases:
            got = fn(inp.clone(), threshold)
            flat = inp.reshape(-1, inp.shape[-1])
            expected = torch.nonzero((flat.abs() >= threshold).any(dim=0)).flatten()
            ex.true(isinstance(got, torch.Tensor), f"return a tensor of feature indices, got {type(got).__name__}")
            ex.true(got.dim() == 1, f"return a 1-D tensor of feature (column) indices, got shape {tuple(got.shape)}",
                    hint="a feature is a column j: reduce over the rows with .any(dim=0), then torch.nonzero(...)"
                         ".flatten(); for a 3-D x, reshape to (-1, features) first")
            rows = torch.nonzero((flat.abs() >= threshold).any(dim=1)).flatten()
            ex.true(torch.equal(got.long(), expected) or not torch.equal(got.long(), rows),
                    f"got {got.tolist()}: the rows (tokens) with an outlier, not the features",
                    hint="LLM.int8 keeps whole input features (columns) in high precision: reduce over dim=0")
            ex.equal(got.long(), expected, f"outlier features of x {tuple(inp.shape)} at threshold {threshold}",
                     hint="use abs() (negative outliers count) and >= (bitsandbytes' test: 6.0 itself is an outlier)")
    return ex.result


def smoothing_factor(fn) -> CheckResult:
    """Exercise 4.3: SmoothQuant's per-channel migration strength."""
    act = torch.tensor([40.0, 1.0, 0.5, 9.0])
    weight = torch.tensor([[0.1, -0.8, 0.2, 0.3], [-0.05, 0.4, -0.6, 0.9]])
    cases = [0.5, 0.75, 0.0, 1.0]
    with exercise("4.3", "SmoothQuant's factor s_j") as ex:
        for alpha in cases:
            got = fn(act.clone(), weight.clone(), alpha)
            w_max = weight.abs().amax(dim=0)
            expected = act.pow(alpha) / w_max.pow(1 - alpha)
            ex.tensor_like(got, expected, f"s for alpha={alpha}",
                           hint="one factor per input channel j: the max over the output rows, weight.abs().amax(dim=0)")
            # 1e-5 relative: pow in float32
            ex.close(got, expected, f"s for alpha={alpha}", atol=0, rtol=1e-5,
                     hint="s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), with max|W_j| over column j (dim=0) and "
                          "the absolute values of W (its negative entries count)")
    return ex.result
