"""Checkers for notebook 07 (QLoRA).

7.1 dequantize_block(fn):      fn(packed uint8 (32,), absmax, table) -> the block's 64 float32 values
7.2 double_quant_bits(fn):     fn(code_bits, blocksize, absmax_bits, blocksize2, absmax2_bits) -> bits per parameter
7.3 lora_params(fn):           fn(config, r, target_modules) -> number of trainable LoRA parameters
"""

from __future__ import annotations

import torch

from . import CheckResult, exercise

__all__ = ["dequantize_block", "double_quant_bits", "lora_params"]


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
