"""Checkers for notebook 05 (quantization-aware training).

5.1 fake_quant(fn):       fn(x, scale, zero_point, qmin, qmax) -> x_hat, quantize then dequantize
5.2 ste_backward(cls):    cls, a torch.autograd.Function whose backward is the straight-through estimator
5.3 lsq_grad_scale(fn):   fn(num_values, bits) -> LSQ's gradient scale 1 / sqrt(N * Qp), symmetric grid
5.4 lsq_scale_grad(fn):   fn(x, scale, qmin, qmax) -> d x_hat / d scale for every value (LSQ, zero point 0)

The expected values are written out (tests/test_check_nb05.py checks them against torch's
fake_quantize_per_tensor_affine and _fake_quantize_learnable_per_tensor_affine).
"""

from __future__ import annotations

import math

import torch

from . import CheckResult, exercise

__all__ = ["fake_quant", "lsq_grad_scale", "lsq_scale_grad", "ste_backward"]

# (x, scale, zero_point, qmin, qmax, expected x_hat). Scales are powers of 2, so x / scale is exact
# and ties (x / scale = k + 0.5) really are ties: torch rounds them to the even neighbour.
_FQ_CASES = [
    # 4-bit symmetric: codes -7..7, scale 0.5 -> levels -3.5..3.5
    ([-5.0, -3.76, -0.25, 0.25, 0.75, 1.25, 3.5, 3.74, 9.0], 0.5, 0, -7, 7,
     [-3.5, -3.5, 0.0, 0.0, 1.0, 1.0, 3.5, 3.5, 3.5]),
    # 3-bit asymmetric: codes 0..7, zero point 3 -> levels -0.75..1.0
    ([-1.0, -0.75, -0.125, 0.125, 0.375, 1.0, 1.1, 2.0], 0.25, 3, 0, 7,
     [-0.75, -0.75, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]),
]


def _fq(x, scale, zp, qmin, qmax, rnd=torch.round, clamp=True, subtract_zp=True):
    q = rnd(x / scale) + zp
    q = q.clamp(qmin, qmax) if clamp else q
    return (q - (zp if subtract_zp else 0)) * scale


def _half_up(t):
    return torch.floor(t + 0.5)


def fake_quant(fn) -> CheckResult:
    """Exercise 5.1: x_hat = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale."""
    with exercise("5.1", "fake-quantize (quantize, then dequantize)") as ex:
        for x, scale, zp, qmin, qmax, expected in _FQ_CASES:
            x = torch.tensor(x)
            got = fn(x.clone(), scale, zp, qmin, qmax)
            what = f"fake_quant(x={x.tolist()}, scale={scale}, zero_point={zp}, qmin={qmin}, qmax={qmax})"
            ex.tensor_like(got, x, what)
            got = got.detach().float()
            if torch.equal(got, _fq(x, scale, zp, qmin, qmax, rnd=_half_up)):
                hint = ("ties (x / scale = 0.5, 1.5, 2.5) round to the even neighbour in torch (torch.round); "
                        "floor(v + 0.5) rounds them up")
            elif torch.equal(got, _fq(x, scale, zp, qmin, qmax, clamp=False)):
                hint = "clamp the code to [qmin, qmax]: values beyond the grid go to its last level"
            elif torch.equal(got, _fq(x, scale, zp, qmin, qmax, subtract_zp=False)):
                hint = "subtract the zero point again before multiplying by the scale"
            elif torch.equal(got, torch.clamp(torch.round(x / scale) + zp, qmin, qmax)):
                hint = "return values, not codes: multiply (code - zero_point) by the scale"
            else:
                hint = ("round(x / scale), add the zero point, clamp to [qmin, qmax], subtract the zero point, "
                        "multiply by the scale")
            ex.close(got, torch.tensor(expected), what, atol=0.0, rtol=0.0, hint=hint)  # exact: on the grid
    return ex.result


# 3-bit symmetric, scale 0.5 (codes -3..3, so the clamp starts at |x| = 1.5). x / scale is
# [-4, -3.5, -3.4, -2, 0, 2.4, 3.4, 3.5, 3.52, 6]; it rounds to [-4, -4, -3, -2, 0, 2, 3, 4, 4, 6]:
# 3.4 and -3.4 need no clamp (their gradient passes), 3.5 and -3.5 are ties that round to +-4 (blocked).
_STE_X = [-2.0, -1.75, -1.7, -1.0, 0.0, 1.2, 1.7, 1.75, 1.76, 3.0]
_STE_MASK = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
# 2-bit asymmetric (codes 0..3), scale 1, zero point 1: codes round(x) + 1, inside for x in [-1.5, 2.5)
_STE_X_ASYM = [-2.0, -1.5, -1.4, 0.0, 2.4, 2.5, 3.0]
_STE_MASK_ASYM = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # -1.5 rounds to -2 (code -1); 2.5 rounds to 2 (code 3)


def ste_backward(cls) -> CheckResult:
    """Exercise 5.2: cls.apply(x, scale, zero_point, qmin, qmax) fake-quantizes; its backward must pass
    the gradient where the rounded code needs no clamping and block it elsewhere."""
    with exercise("5.2", "the straight-through estimator") as ex:
        for xs, scale, zp, qmin, qmax, mask in ((_STE_X, 0.5, 0.0, -3, 3, _STE_MASK),
                                                (_STE_X_ASYM, 1.0, 1.0, 0, 3, _STE_MASK_ASYM)):
            x = torch.tensor(xs, requires_grad=True)
            grad_output = torch.arange(1.0, len(xs) + 1) / 10  # distinct values: a wrong scaling shows
            y = cls.apply(x, torch.tensor(scale), torch.tensor(zp), qmin, qmax)
            y.backward(grad_output)
            what = f"x.grad for x = {xs} (scale {scale}, zero point {zp:g}, codes {qmin}..{qmax})"
            ex.true(x.grad is not None, f"{what}: no gradient reached x",
                    hint="return the gradient for x as the first value of backward (None for the others)")
            got, expected = x.grad, grad_output * torch.tensor(mask)
            naive = grad_output * ((x.detach() / scale + zp >= qmin) & (x.detach() / scale + zp <= qmax))
            if torch.equal(got, grad_output):
                hint = "the STE passes the gradient only where the code needed no clamping: zero elsewhere"
            elif not got.any():
                hint = ("zero everywhere is the true derivative of round(); the STE pretends round() was "
                        "the identity, so the gradient passes where the code was not clamped")
            elif torch.equal(got, naive):
                hint = ("test the rounded code round(x / scale) + zero_point against [qmin, qmax], as torch "
                        "does: a value less than half a step beyond the last level still rounds onto it")
            else:
                hint = "grad_input = grad_output where qmin <= round(x / scale) + zero_point <= qmax, else 0"
            ex.close(got, expected, what, atol=0.0, rtol=0.0, hint=hint)  # exact: grad_output times 0 or 1
    return ex.result


_G_CASES = [(1024, 4), (256 * 768, 3), (64, 8), (100, 2)]


def lsq_grad_scale(fn) -> CheckResult:
    """Exercise 5.3: g = 1 / sqrt(N * Qp), Qp = 2^(bits-1) - 1, the largest code of the symmetric grid."""
    with exercise("5.3", "LSQ gradient scale") as ex:
        for n, bits in _G_CASES:
            got = fn(n, bits)
            if isinstance(got, torch.Tensor):
                got = got.item()
            qp = 2 ** (bits - 1) - 1
            expected = 1 / math.sqrt(n * qp)
            hint = "g = 1 / sqrt(N * Qp) with Qp = 2**(bits - 1) - 1, the largest positive code"
            if isinstance(got, (int, float)) and math.isclose(got, 1 / math.sqrt(n * 2 ** (bits - 1)), rel_tol=1e-9):
                hint = "Qp is the largest code, 2**(bits - 1) - 1, not 2**(bits - 1)"
            elif isinstance(got, (int, float)) and math.isclose(got, 1 / (n * qp), rel_tol=1e-9):
                hint = "take the square root of N * Qp"
            elif isinstance(got, (int, float)) and math.isclose(got, 1 / math.sqrt(n * (2**bits - 1)), rel_tol=1e-9):
                hint = "this is the symmetric (signed) grid: Qp = 2**(bits - 1) - 1, not 2**bits - 1"
            ex.close(got, expected, f"lsq_grad_scale({n}, {bits})", atol=0.0, rtol=1e-9, hint=hint)
    return ex.result


# 3-bit symmetric (codes -3..3), scale 0.5: x / scale = [-4, -3.5, -0.6, 0, 0.6, 1.6, 3.4, 3.5, 6]
_LSQ_X = [-2.0, -1.75, -0.3, 0.0, 0.3, 0.8, 1.7, 1.75, 3.0]
_LSQ_GRAD = [-3.0, -3.0, -0.4, 0.0, 0.4, 0.4, -0.4, 3.0, 3.0]  # qmin below, round(v) - v inside, qmax above


def lsq_scale_grad(fn) -> CheckResult:
    """Exercise 5.4: d x_hat / d s = round(x/s) - x/s inside the range, qmin below it, qmax above it."""
    with exercise("5.4", "LSQ gradient of the step size") as ex:
        x = torch.tensor(_LSQ_X)
        got = fn(x.clone(), 0.5, -3, 3)
        what = f"d x_hat / d scale for x = {_LSQ_X} (scale 0.5, codes -3..3)"
        ex.tensor_like(got, x, what)
        expected = torch.tensor(_LSQ_GRAD)
        got = got.detach().float()
        inside = torch.tensor([False, False] + [True] * 5 + [False, False])  # where no clamp acts
        if torch.allclose(got, -expected, atol=1e-6):
            hint = "the sign: inside the range it is round(x/s) - x/s (x_hat = s * round(x/s))"
        elif torch.allclose(got[inside], expected[inside], atol=1e-6) and not got[~inside].any():
            hint = ("where x is clamped, x_hat = s * qmin (or s * qmax) still moves with s: the gradient is "
                    "qmin (or qmax) there, not 0")
        else:
            hint = "round(x/s) - x/s where qmin <= round(x/s) <= qmax, qmin where below, qmax where above"
        # 1e-6: x / 0.5 is exact, but round(v) - v of v = -0.6 is -0.4 only to float32 precision
        ex.close(got, expected, what, atol=1e-6, rtol=0.0, hint=hint)
    return ex.result
