"""Checkers for notebook 07 (QLoRA).

7.1 dequantize_block(fn):      fn(packed uint8 (32,), absmax, table) -> the block's 64 float32 values
7.2 double_quant_bits(fn):     fn(code_bits, blocksize, absmax_bits, blocksize2, absmax2_bits) -> bits per parameter
7.3 lora_params(fn):           fn(config, r, target_modules) -> number of trainable LoRA parameters
7.4 loftq_step(fn):            fn(w, low_rank, r, quant) -> (Q, low_rank'): one LoftQ alternation,
                               Q = quant(W - low_rank), low_rank' = SVD_r(W - Q)
"""

from __future__ import annotations

import torch

from . import CheckResult, exercise

__all__ = ["dequantize_block", "double_quant_bits", "loftq_step", "lora_params"]


def double_quant_bits(fn) -> CheckResult:
    """Exercise 7.2: code bits + first-level scales per weight + second-level scales per weight."""
    cases = [  # (code_bits, blocksize, absmax_bits, blocksize2, absmax2_bits) -> exact answer
        ((4, 64, 8, 256, 32), 4 + 8 / 64 + 32 / (64 * 256)),     # QLoRA: 4.127
        ((4, 128, 8, 256, 32), 4 + 8 / 128 + 32 / (128 * 256)),  # larger blocks: 4.064
        ((3, 32, 8, 128, 16), 3 + 8 / 32 + 16 / (32 * 128)),     # 3.254
    ]
    with exercise("7.2", "bits per parameter with double quantization") as ex:
        for args, expected in cases:
            got = fn(*args)
            if abs(float(got) - (args[0] + args[2] / args[1] + args[4] / args[3])) < 1e-9:
                ex.fail(f"for {args} you got {float(got):.6g}, which charges each second-level scale to "
                        f"only blocksize2 = {args[3]} weights",
                        hint="a second-level scale covers blocksize2 first-level blocks, i.e. "
                             "blocksize * blocksize2 weights")
            # 1e-9: the answer is a sum of three exact binary fractions
            ex.close(got, expected, f"bits per parameter for {args}", atol=1e-9, rtol=0,
                     hint="code_bits + absmax_bits / blocksize + absmax2_bits / (blocksize * blocksize2)")
    return ex.result


def _block(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed (32,), absmax, expected (64,)) of one NF4 block of a fixed pseudo-random weight."""
    from qlearn.quant import nf4

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, generator=g) * 0.03
    state = nf4.quantize_nf4(w)
    codes = state.codes
    packed = (codes[0::2] << 4) | codes[1::2]  # bitsandbytes: the first code in the high nibble
    return packed, state.absmax[0], state.dequantize()


def dequantize_block(fn) -> CheckResult:
    """Exercise 7.1: unpack two codes per byte (high nibble first), look them up, scale by absmax."""
    from qlearn.quant.nf4 import codebook

    table = codebook()
    with exercise("7.1", "dequantize one packed NF4 block") as ex:
        for seed in (0, 1):
            packed, absmax, expected = _block(seed)
            got = fn(packed.clone(), absmax.clone(), table.clone())
            ex.tensor_like(got, expected, "the block", hint="return all 64 values: two per byte")
            swapped = table[torch.stack([packed & 0xF, packed >> 4], 1).reshape(-1).long()] * absmax
            if torch.allclose(got.float(), swapped, atol=1e-7):
                ex.fail("your values come out pairwise swapped",
                        hint="bitsandbytes stores the FIRST code of a pair in the HIGH nibble: byte >> 4 comes first")
            if torch.allclose(got.float() * absmax, expected, atol=1e-7) or \
                    torch.allclose(got.float(), expected / absmax, atol=1e-7):
                ex.fail("the values are right up to the block's scale", hint="multiply table[codes] by absmax")
            # exact: one table lookup and one float32 multiplication, as bitsandbytes' kernel does
            ex.close(got.float(), expected, "the block", atol=0, rtol=0,
                     hint="codes = stack([byte >> 4, byte & 0xF], dim=1).reshape(-1); values = table[codes] * absmax")
    return ex.result


def _expected_lora_params(config, r: int, target_modules) -> int:
    h, m, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, (config.num_key_value_heads or config.num_attention_heads) * head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}  # (in, out)
    return n_layers * sum(r * sum(shapes[t]) for t in target_modules)


def lora_params(fn) -> CheckResult:
    """Exercise 7.3: r * (in + out) for every adapted linear layer of a Llama config."""
    from transformers import LlamaConfig

    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tiny = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=4)
    gqa = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2)  # k and v narrower than q
    llama7b = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32)
    cases = [(tiny, 8, all7, "the course's tiny model, r=8, all 7 projections"),
             (tiny, 4, ["q_proj", "v_proj"], "the tiny model, r=4, q and v only (the LoRA paper's choice)"),
             (gqa, 8, all7, "a model with grouped-query attention (2 key/value heads of 8)"),
             (llama7b, 64, all7, "LLaMA-7B, r=64, all projections (the QLoRA paper's setting)")]
    with exercise("7.3", "count the trainable parameters of a (Q)LoRA model") as ex:
        for config, r, targets, what in cases:
            got = fn(config, r, list(targets))
            expected = _expected_lora_params(config, r, targets)
            if config is gqa and got == _expected_lora_params(
                    LlamaConfig(**{**gqa.to_dict(), "num_key_value_heads": 8}), r, targets):
                ex.fail(f"{what}: expected {expected}, got {got}",
                        hint="k_proj and v_proj output num_key_value_heads * head_dim values, not hidden_size")
            ex.equal(got, expected, what,
                     hint="each adapted layer adds A (r x in_features) and B (out_features x r); "
                          "sum over the targets and multiply by num_hidden_layers")
    return ex.result


def _rtn2(w: torch.Tensor) -> torch.Tensor:
    """LoftQ's 2-bit quantizer in qlearn.lora: asymmetric RTN in groups of 64, dequantized to float32."""
    from qlearn.quant import quantize

    return quantize(w, 2, symmetric=False, group_size=64).dequantize(torch.float32)


def _svd_r(m: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of m (Eckart-Young): U_r diag(S_r) V_r^T."""
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def loftq_step(fn) -> CheckResult:
    """Exercise 7.4: Q = quant(W - low_rank), then low_rank' = SVD_r(W - Q) (qlearn.lora.loftq_init's loop)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 128, generator=g) * 0.05
    w[:, 5] *= 8  # an outlier input feature: a large, low-rank quantization error for the adapter to take
    r = 4
    q1 = _rtn2(w)
    l1 = _svd_r(w - q1, r)
    cases = [(torch.zeros_like(w), "the first step (low_rank = 0: Q is QLoRA's quant(W))"),
             (l1, "the second step (low_rank from the first)")]
    with exercise("7.4", "one LoftQ alternation step") as ex:
        for low_rank, what in cases:
            got = fn(w.clone(), low_rank.clone(), r, _rtn2)
            if not isinstance(got, tuple) or len(got) != 2:
                ex.fail(f"{what}: return a tuple (Q, low_rank), got {type(got).__name__}",
                        hint="return q, low_rank")
            q, new = got
            q_ref = _rtn2(w - low_rank)
            new_ref = _svd_r(w - q_ref, r)
            ex.tensor_like(q, w, f"{what}: Q")
            ex.tensor_like(new, w, f"{what}: low_rank")
            if low_rank.abs().sum() > 0 and torch.equal(q.float(), q1) and not torch.equal(q1, q_ref):
                ex.fail(f"{what}: your Q is quant(W), the same at every step",
                        hint="Q = quant(W - low_rank): quantize what the adapter does not already carry")
            # exact: the same quantizer on the same float32 input
            ex.close(q.float(), q_ref, f"{what}: Q", atol=0, rtol=0, hint="Q = quant(w - low_rank)")
            if torch.allclose(new.float(), _svd_r(w, r), atol=1e-4):
                ex.fail(f"{what}: your low_rank is the top-r part of W itself (that is PiSSA's adapter)",
                        hint="the adapter fits the quantization error: SVD of W - Q, not of W")
            if torch.allclose(new.float(), w - q_ref, atol=1e-4):
                ex.fail(f"{what}: your low_rank is the whole error W - Q, of full rank",
                        hint="keep only the top r singular triplets: U[:, :r] diag(S[:r]) Vh[:r]")
            # 1e-5: the same SVD, its factors multiplied in another order, differs by float32 rounding
            # (entries of size ~0.1, a few ulps of 1e-8 each)
            ex.close(new.float(), new_ref, f"{what}: low_rank", atol=1e-5, rtol=1e-4,
                     hint="U, S, Vh = torch.linalg.svd(w - q, full_matrices=False); "
                          "low_rank = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]")
        err0, err2 = (w - q1).norm().item(), (w - q_ref - new_ref).norm().item()
        ex.true(err2 < err0, f"||W - (Q + low_rank)|| after two steps {err2:.4f} should be below QLoRA's "
                f"||W - quant(W)|| {err0:.4f}")
    return ex.result
