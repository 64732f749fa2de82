"""Checkers for notebook 06 (fine-tuning regimes).

6.1 bf16_update_survives(fn): fn(w: bf16 Tensor, update: fp32 Tensor) -> bool Tensor, whether
                              bf16(w + update) differs from w (the update is not lost)
6.2 lora_forward(fn):         fn(x, W, b, A, B, alpha, r) -> x W^T + b + (alpha / r) x A^T B^T
6.3 lora_param_count(fn):     fn(config, r, target_modules) -> trainable parameters LoRA adds to a Llama
6.4 merge_lora_weight(fn):    fn(W, A, B, alpha, r) -> W + (alpha / r) B @ A, without changing W
6.5 lora_scaling(fn):         fn(alpha, r, use_rslora) -> alpha / r, or alpha / sqrt(r) (rsLoRA)
6.6 dora_weight(fn):          fn(W, A, B, m, scaling) -> m (W + s B A) / ||W + s B A||, the norm of each row
6.7 pissa_init(fn):           fn(W, r, scaling) -> (A, B, W_res): s B A = U_r S_r V_r^T, W_res = W - s B A
"""

from __future__ import annotations

import math

import torch

from . import CheckResult, exercise

__all__ = ["bf16_update_survives", "dora_weight", "lora_forward", "lora_param_count", "lora_scaling",
           "merge_lora_weight", "pissa_init"]

# (weight, update, survives): bf16 keeps 8 significant bits, so the spacing at w in [2^e, 2^(e+1)) is
# 2^(e-7), and an update survives round-to-nearest-even when it is more than half of it (exactly half:
# it survives only when rounding to even moves it).
_SURVIVE_CASES = [
    (1.0, 1e-3, False),        # spacing above 1 is 2^-7 = 0.0078: 0.001 < 0.0039, lost
    (1.0, 5e-3, True),         # 0.005 > 0.0039: rounds up to 1.0078
    (1.0, -2.5e-3, True),      # below 1 the spacing halves (2^-8): 0.0025 > 0.00195
    (0.01, 1e-5, False),       # at 0.01 the spacing is 2^-14 = 6.1e-5: a typical lr of 1e-5 is lost
    (0.01, 4e-5, True),
    (1000.0, 1.0, False),      # at 1000 the spacing is 4: integers are gone
    (1.0, 2.0**-8, False),     # exactly half a spacing: a tie, rounds to even (back to 1.0)
    (1.0078125, 2.0**-8, True),  # 1 + 2^-7 is odd: the tie rounds to even 1 + 2^-6
]


def bf16_update_survives(fn) -> CheckResult:
    """Exercise 6.1: does adding `update` to a bf16 weight change it?"""
    with exercise("6.1", "does a bf16 weight update survive?") as ex:
        w = torch.tensor([c[0] for c in _SURVIVE_CASES], dtype=torch.bfloat16)
        u = torch.tensor([c[1] for c in _SURVIVE_CASES], dtype=torch.float32)
        expected = torch.tensor([c[2] for c in _SURVIVE_CASES])
        got = fn(w.clone(), u.clone())
        ex.true(isinstance(got, torch.Tensor), f"expected a bool tensor, got {type(got).__name__}")
        ex.equal(got.bool(), expected, what=f"survives for w={[c[0] for c in _SURVIVE_CASES]}",
                 hint="add in fp32, round the sum to bf16 (.to(torch.bfloat16)) and compare with w; comparing "
                      "the fp32 sum with w says 'changed' for every non-zero update")
    return ex.result


def _lora_case(seed: int, r: int, alpha: float, bias: bool):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = 3, 5
    x = torch.randn(2, in_f, generator=g)
    W = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    A = torch.randn(r, in_f, generator=g)
    B = torch.randn(out_f, r, generator=g)
    return x, W, b, A, B, alpha, r


def lora_forward(fn) -> CheckResult:
    """Exercise 6.2: the LoRA layer's forward pass."""
    with exercise("6.2", "LoRA forward") as ex:
        for seed, r, alpha, bias in [(0, 2, 4.0, True), (1, 1, 1.0, False), (2, 4, 16.0, True)]:
            x, W, b, A, B, alpha, r = _lora_case(seed, r, alpha, bias)
            expected = x @ W.T + (0 if b is None else b) + (alpha / r) * (x @ A.T @ B.T)
            without_scaling = x @ W.T + (0 if b is None else b) + x @ A.T @ B.T
            got = fn(x, W, b, A, B, alpha, r)
            if isinstance(got, torch.Tensor) and got.shape == expected.shape and r != alpha and \
                    torch.allclose(got, without_scaling, atol=1e-5):
                ex.fail("the low-rank update is missing its scaling", hint="multiply x A^T B^T by alpha / r")
            ex.close(got, expected, what=f"lora_forward with r={r}, alpha={alpha}, bias={b is not None}",
                     atol=1e-5, rtol=1e-5,  # fp32 sums in a different order
                     hint="W is (out, in), A is (r, in), B is (out, r): x @ W.T + b + (alpha / r) * (x @ A.T @ B.T); "
                          "skip b when it is None")
    return ex.result


def _config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**kw)


ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (config kwargs, r, targets, expected, what): the expected counts are checked against apply_lora on
# the same shapes in tests/test_check_nb05.py; 6,815,744 and 41,943,040 are the counts PEFT prints for
# Llama-3-8B.
_COUNT_CASES = [
    (dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=4,
          num_hidden_layers=6, vocab_size=8192), 8, ALL7, 245_760, "the course's tiny model, all 7 projections"),
    (dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
          num_hidden_layers=32, vocab_size=128256), 16, ["q_proj", "v_proj"], 6_815_744, "Llama-3-8B, q and v"),
    (dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
          num_hidden_layers=32, vocab_size=128256), 16, ALL7, 41_943_040, "Llama-3-8B, all 7 projections"),
]


def lora_param_count(fn) -> CheckResult:
    """Exercise 6.3: the trainable parameters LoRA adds, r (in + out) per adapted layer."""
    with exercise("6.3", "count LoRA's trainable parameters") as ex:
        for kwargs, r, targets, expected, what in _COUNT_CASES:
            got = fn(_config(**kwargs), r, list(targets))
            gqa = kwargs["num_key_value_heads"] != kwargs["num_attention_heads"]
            hint = ("each adapted (out x in) layer adds A (r x in) and B (out x r): r * (in + out), times "
                    "num_hidden_layers")
            if gqa:
                hint += ("; with grouped-query attention k_proj and v_proj are narrower: out = "
                         "num_key_value_heads * head_dim (head_dim = hidden_size // num_attention_heads)")
            ex.equal(got, expected, what=f"{what} (r={r})", hint=hint)
    return ex.result


def merge_lora_weight(fn) -> CheckResult:
    """Exercise 6.4: merge by hand, W' = W + (alpha / r) B @ A."""
    with exercise("6.4", "merge LoRA into the weight") as ex:
        # small integers: every product and sum is exact in fp32, so the comparison is exact
        W = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (out=2, in=3)
        A = torch.tensor([[1.0, 0.0, -1.0]])                  # (r=1, in=3)
        B = torch.tensor([[2.0], [-1.0]])                     # (out=2, r=1)
        W_before = W.clone()
        got = fn(W, A, B, 4.0, 1)
        ex.equal(got, torch.tensor([[9.0, 2.0, -5.0], [0.0, 5.0, 10.0]]), what="merge with alpha=4, r=1",
                 hint="B @ A is (out, in) like W; scale it by alpha / r and add")
        ex.true(torch.equal(W, W_before), "your function changed W in place",
                hint="return W + ... (a new tensor) instead of W += ..., so the base can be restored")
        g = torch.Generator().manual_seed(5)
        W, A, B = torch.randn(4, 6, generator=g), torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)
        ex.close(fn(W, A, B, 8.0, 2), W + 4.0 * (B @ A), what="merge with alpha=8, r=2", atol=1e-6, rtol=1e-6,
                 hint="the scaling is alpha / r = 4 here")
    return ex.result


# (alpha, r, use_rslora): alpha / r, or rsLoRA's alpha / sqrt(r); the two agree at r = 1
_SCALING_CASES = [(16, 8, False), (16, 8, True), (16, 64, True), (16, 64, False), (8, 1, True), (32, 4, True)]


def lora_scaling(fn) -> CheckResult:
    """Exercise 6.5: LoRA's scaling s, plain (alpha / r) or rank-stabilized (alpha / sqrt(r))."""
    with exercise("6.5", "rsLoRA's scaling") as ex:
        for alpha, r, rs in _SCALING_CASES:
            got = fn(alpha, r, rs)
            expected = alpha / math.sqrt(r) if rs else alpha / r
            what = f"scaling for alpha={alpha}, r={r}, use_rslora={rs}"
            if isinstance(got, (int, float)) and r > 1:
                if rs and math.isclose(got, alpha / r):
                    ex.fail(f"{what}: got alpha / r = {got:g}", hint="rsLoRA divides alpha by sqrt(r), not by r")
                if math.isclose(got, math.sqrt(alpha / r)):
                    ex.fail(f"{what}: got sqrt(alpha / r) = {got:g}",
                            hint="the square root is of r alone: alpha / math.sqrt(r)")
                if not rs and math.isclose(got, alpha / math.sqrt(r)):
                    ex.fail(f"{what}: got alpha / sqrt(r) = {got:g}",
                            hint="without use_rslora it is plain LoRA's alpha / r")
            ex.close(got, expected, what=what, atol=0, rtol=1e-12,  # one division and one square root
                     hint="s = alpha / r for LoRA, alpha / math.sqrt(r) for rsLoRA")
    return ex.result


def _dora_case():
    # small integers and halves: W + s B A is exact in fp32, so the checker's answer is the formula's
    W = torch.tensor([[3.0, 0.0, 4.0], [0.0, 1.0, 0.0]])  # (out=2, in=3): row norms 5 and 1, column norms 3, 1, 4
    A = torch.tensor([[0.0, 1.0, 0.0]])                    # (r=1, in=3)
    B = torch.tensor([[0.5], [1.0]])                       # (out=2, r=1)
    m = torch.tensor([10.0, 3.0])                          # the magnitude, one per output feature (row)
    return W, A, B, m, 2.0


def _dora(W, A, B, m, scaling, dim=1, with_delta_in_norm=True):
    adapted = W + scaling * (B @ A)
    norm = (adapted if with_delta_in_norm else W).norm(dim=dim, keepdim=True)  # (out, 1) or (1, in)
    return m.view(-1, 1) * adapted / norm


def dora_weight(fn) -> CheckResult:
    """Exercise 6.6: DoRA's merged weight, magnitude times the unit-norm direction of each row."""
    with exercise("6.6", "DoRA's weight: magnitude and direction") as ex:
        W, A, B, m, s = _dora_case()
        got = fn(W.clone(), A.clone(), B.clone(), m.clone(), s)
        expected = _dora(W, A, B, m, s)
        ex.tensor_like(got, expected, what="the DoRA weight", hint="return an (out, in) tensor like W")
        tol = dict(atol=1e-6, rtol=1e-6)  # one norm and one division in fp32
        if torch.allclose(got, m.view(-1, 1) * (W + s * B @ A) / (W + s * B @ A).norm(dim=0), **tol):
            ex.fail("you normalized the columns", hint="DoRA's norm is per output feature: the rows of the "
                    "(out, in) weight, (W + s B A).norm(dim=1, keepdim=True), as PEFT's lora_magnitude_vector")
        if torch.allclose(got, _dora(W, A, B, m, s, with_delta_in_norm=False), **tol):
            ex.fail("you divided by the norm of W", hint="the direction is the ADAPTED weight's: divide "
                    "W + s B A by its own row norms, so that every row of the result has norm m")
        if torch.allclose(got, _dora(W, A, B, m, 1.0), **tol):
            ex.fail("the update is missing its scaling", hint="add scaling * (B @ A), not B @ A")
        ex.close(got, expected, what="the DoRA weight for W=[[3,0,4],[0,1,0]], m=[10,3], s=2", **tol,
                 hint="m.view(-1, 1) * (W + s B A) / (W + s B A).norm(dim=1, keepdim=True)")
        ex.close(got.norm(dim=1), m, what="the row norms of your weight", **tol,
                 hint="each row of DoRA's weight has norm m: the magnitude is the row's length")
    return ex.result


def _pissa_case():
    g = torch.Generator().manual_seed(6)
    return torch.randn(6, 5, generator=g), 2, 0.5  # W (out=6, in=5), r, scaling


def pissa_init(fn) -> CheckResult:
    """Exercise 6.7: PiSSA's A, B (top-r singular triplets) and the residual the base keeps."""
    with exercise("6.7", "PiSSA's initialization") as ex:
        W, r, s = _pissa_case()
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)  # S descending
        top = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]  # the best rank-r approximation of W
        bottom = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]
        got = fn(W.clone(), r, s)
        ex.true(isinstance(got, tuple) and len(got) == 3, "expected a tuple (A, B, W_res)",
                hint="return A, B, W - scaling * B @ A")
        A, B, W_res = got
        ex.tensor_like(A, torch.empty(r, 5), what="A", hint="A is (r, in) = sqrt(S_r / scaling)[:, None] * Vh[:r]")
        ex.tensor_like(B, torch.empty(6, r), what="B", hint="B is (out, r) = U[:, :r] * sqrt(S_r / scaling)")
        product = s * (B.double() @ A.double())  # products, so the SVD's sign freedom does not matter
        tol = dict(atol=1e-5, rtol=1e-5)  # a float32 SVD against this float64 one
        if torch.allclose(product, bottom, **tol):
            ex.fail("your adapter holds the r SMALLEST singular triplets",
                    hint="torch.linalg.svd returns S in descending order: the top r are U[:, :r], S[:r], Vh[:r]")
        if torch.allclose(product, s * s * top, **tol) or torch.allclose(product, top / s, **tol) \
                or torch.allclose(product, s * top, **tol):
            ex.fail("scaling * B @ A is not U_r S_r V_r^T",
                    hint="split S_r / scaling between the two factors: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T")
        ex.close(product, top, what="scaling * B @ A", **tol,
                 hint="the adapter starts as the top-r part of the SVD: scaling * B @ A = U_r S_r V_r^T")
        if torch.allclose(W_res.double(), W.double(), **tol):
            ex.fail("W_res equals W", hint="the base keeps the residual W - scaling * B @ A, so that "
                    "W_res + scaling * B @ A = W and the model starts unchanged")
        ex.close(W_res.double(), W.double() - top, what="W_res", **tol, hint="W_res = W - scaling * B @ A")
    return ex.result
