"""The notebook 05 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted; their written-out answers are torch's."""

import math

import torch

from qlearn.check import nb05


def fake_quant(x, scale, zero_point, qmin, qmax):
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fake_quant_half_up(x, scale, zero_point, qmin, qmax):
    q = torch.clamp(torch.floor(x / scale + 0.5) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fake_quant_no_clamp(x, scale, zero_point, qmin, qmax):
    return torch.round(x / scale) * scale


def fake_quant_codes(x, scale, zero_point, qmin, qmax):
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


class _Forward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qmin, ctx.qmax = qmin, qmax
        return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


class STE(_Forward):
    @staticmethod
    def backward(ctx, grad_output):
        x, scale, zero_point = ctx.saved_tensors
        q = torch.round(x / scale) + zero_point
        return grad_output * ((q >= ctx.qmin) & (q <= ctx.qmax)), None, None, None, None


class IdentitySTE(_Forward):  # the usual mistake: no clamp in the backward
    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None


class UnroundedSTE(_Forward):  # the subtle mistake: the mask tests x / scale instead of the rounded code
    @staticmethod
    def backward(ctx, grad_output):
        x, scale, zero_point = ctx.saved_tensors
        v = x / scale + zero_point
        return grad_output * ((v >= ctx.qmin) & (v <= ctx.qmax)), None, None, None, None


class StubSTE(_Forward):
    @staticmethod
    def backward(ctx, grad_output):
        raise NotImplementedError("Exercise 5.2: replace this line with your solution")


def lsq_grad_scale(num_values, bits):
    return 1 / math.sqrt(num_values * (2 ** (bits - 1) - 1))


def lsq_grad_scale_pow2(num_values, bits):
    return 1 / math.sqrt(num_values * 2 ** (bits - 1))


def lsq_scale_grad(x, scale, qmin, qmax):
    v = x / scale
    r = torch.round(v)
    return torch.where(r < qmin, float(qmin), torch.where(r > qmax, float(qmax), r - v))


def lsq_scale_grad_zero_outside(x, scale, qmin, qmax):
    v = x / scale
    r = torch.round(v)
    return torch.where((r >= qmin) & (r <= qmax), r - v, 0.0)


def stub(*args):
    raise NotImplementedError("Exercise 5.x: replace this line with your solution")


def test_fake_quant_cases_are_torchs():
    for x, scale, zp, qmin, qmax, expected in nb05._FQ_CASES:
        got = torch.fake_quantize_per_tensor_affine(torch.tensor(x), scale, zp, qmin, qmax)
        assert got.tolist() == expected


def test_ste_masks_are_torchs_gradient():
    for xs, scale, zp, qmin, qmax, mask in ((nb05._STE_X, 0.5, 0, -3, 3, nb05._STE_MASK),
                                            (nb05._STE_X_ASYM, 1.0, 1, 0, 3, nb05._STE_MASK_ASYM)):
        x = torch.tensor(xs, requires_grad=True)
        torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax).sum().backward()
        assert x.grad.tolist() == mask


def test_lsq_cases_are_torchs_learnable_fake_quant():
    expected = []
    for v in nb05._LSQ_X:  # one value at a time: torch sums the scale gradient over the tensor
        scale = torch.tensor([0.5], requires_grad=True)
        torch._fake_quantize_learnable_per_tensor_affine(torch.tensor([v]), scale, torch.zeros(1), -3, 3, 1.0).sum().backward()
        expected.append(scale.grad.item())
    # 1e-6: round(v) - v in float32 (x / 0.5 is exact; -0.6 is not representable)
    torch.testing.assert_close(torch.tensor(expected), torch.tensor(nb05._LSQ_GRAD), atol=1e-6, rtol=0)


def test_fake_quant_checker(capsys):
    assert nb05.fake_quant(fake_quant).passed
    result = nb05.fake_quant(fake_quant_half_up)
    assert result.status == "FAILED" and "even neighbour" in result.message
    result = nb05.fake_quant(fake_quant_no_clamp)
    assert result.status == "FAILED" and "clamp the code" in result.message
    result = nb05.fake_quant(fake_quant_codes)
    assert result.status == "FAILED" and "return values, not codes" in result.message
    assert nb05.fake_quant(stub).status == "NOT ATTEMPTED"
    assert "[qlearn.check] PASSED 5.1" in capsys.readouterr().out


def test_ste_backward_checker():
    assert nb05.ste_backward(STE).passed
    result = nb05.ste_backward(IdentitySTE)
    assert result.status == "FAILED" and "zero elsewhere" in result.message
    result = nb05.ste_backward(UnroundedSTE)
    assert result.status == "FAILED" and "test the rounded code" in result.message
    assert nb05.ste_backward(StubSTE).status == "NOT ATTEMPTED"


def test_lsq_grad_scale_checker():
    assert nb05.lsq_grad_scale(lsq_grad_scale).passed
    result = nb05.lsq_grad_scale(lsq_grad_scale_pow2)
    assert result.status == "FAILED" and "not 2**(bits - 1)" in result.message
    assert nb05.lsq_grad_scale(stub).status == "NOT ATTEMPTED"


def test_lsq_scale_grad_checker():
    assert nb05.lsq_scale_grad(lsq_scale_grad).passed
    result = nb05.lsq_scale_grad(lsq_scale_grad_zero_outside)
    assert result.status == "FAILED" and "not 0" in result.message
    result = nb05.lsq_scale_grad(lambda *a: -lsq_scale_grad(*a))
    assert result.status == "FAILED" and "the sign" in result.message
    assert nb05.lsq_scale_grad(stub).status == "NOT ATTEMPTED"


def test_library_agrees_with_the_checkers():
    from qlearn.quant.qat import fake_quantize
    from qlearn.quant.qat import lsq_grad_scale as library_g

    for x, scale, zp, qmin, qmax, expected in nb05._FQ_CASES:
        bits, symmetric = (4, True) if qmin < 0 else (3, False)
        got = fake_quantize(torch.tensor(x), bits, symmetric, scale=torch.tensor(scale), zero_point=torch.tensor(zp))
        assert got.tolist() == expected
    assert all(library_g(n, b) == lsq_grad_scale(n, b) for n, b in nb05._G_CASES)
