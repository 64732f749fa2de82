"""The QLoRA paper's headline, measured: one fine-tuning step of a 65B-parameter Llama in under 48 GB.

    python benchmarks/qlora_65b.py [--shape llama-65b] [--out benchmarks/gpu/qlora_65b.json]

Dettmers et al. 2023 (arXiv:2305.14314) fine-tune LLaMA-65B on a single 48 GB GPU. There is no 65B
checkpoint here (and 130 GB of bf16 weights would not fit the disk), so the model is built with random
weights, layer by layer, the way a loader streams a checkpoint:

1. the whole LlamaForCausalLM is created on the meta device (shapes only, no memory);
2. for each block, each of its 7 linear layers gets a bf16 N(0, 0.02) weight made on the GPU, which
   bitsandbytes quantizes to NF4 with double quantization (Params4bit, blocks of 64) at once, so at
   most one 16-bit matrix (8192 x 22016 = 360 MB) exists at a time;
3. embeddings, norms and the head are materialised on the GPU; then QLoRA's recipe as a learner runs
   it: peft.prepare_model_for_kbit_training (fp32 norms, embeddings and head, gradient checkpointing),
   LoRA r=64, alpha=16 on all linear layers (the paper's setting), bitsandbytes' paged AdamW 8-bit.

It then runs `--steps` optimizer steps on random tokens (batch 1 x 512) and records the peak of
torch.cuda.max_memory_allocated beside qlearn.memory.estimate's ledger for the same configuration.
`--shape tiny --device cpu` runs the same code on the course's model shape as a smoke test (no memory
figures: the CPU has no allocator statistics this script reads).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib.metadata import version
from pathlib import Path

import torch

from qlearn import gpu_lab, memory

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(shape: str):
    """A transformers LlamaConfig for one of qlearn.memory.LLAMA_SHAPES (no GQA: LLaMA 1 shapes)."""
    from transformers import LlamaConfig

    s = memory.LLAMA_SHAPES[shape]
    return LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], num_key_value_heads=s["heads"], vocab_size=s["vocab"],
                       max_position_embeddings=2048, tie_word_embeddings=False)


def build_qlora_base(config, device: torch.device, seed: int = 0):
    """LlamaForCausalLM with NF4 (double-quantized) block linears, built layer by layer on `device`."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        for name in TARGETS:
            parent = layer.self_attn if name[0] in "qkvo" else layer.mlp  # q, k, v, o; else gate, up, down
            old = getattr(parent, name)
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=torch.bfloat16,
                                    compress_statistics=True, quant_type="nf4", device="meta")
            w = torch.empty(old.out_features, old.in_features, dtype=torch.bfloat16, device=device)
            w.normal_(0.0, 0.02, generator=gen)
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                           blocksize=64, module=new).to(device)  # quantized here
            del w
            setattr(parent, name, new)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.to_empty(device=device).weight.data.fill_(1.0)
    model.model.norm.to_empty(device=device).weight.data.fill_(1.0)
    for emb in (model.model.embed_tokens, model.lm_head):
        emb.to_empty(device=device)
        emb.weight.data = emb.weight.data.to(torch.bfloat16).normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its inv_freq buffer was on meta
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT reads it
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-65b", choices=sorted(memory.LLAMA_SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/gpu/qlora_65b.json"))
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --shape tiny --device cpu for a smoke test)")
    config = llama_config(args.shape)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_qlora_base(config, device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1) for p in model.parameters())
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cuda:
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(trainable, lr=2e-4)
    else:
        opt = torch.optim.AdamW(trainable, lr=2e-4)
    if cuda:
        torch.cuda.synchronize()
        weights_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times, losses = gpu_lab.train_steps(model, opt, steps=args.steps, batch_size=1, seq_len=args.seq_len,
                                        device=device)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    ledger = memory.estimate(args.shape, "qlora", batch_size=1, seq_len=args.seq_len, lora_r=args.lora_r,
                             grad_checkpointing=True, optimizer="paged_adamw_8bit")
    print(f"{args.shape}: {params / 1e9:.2f}B parameters built and quantized in {build_s:.0f} s; "
          f"{sum(p.numel() for p in trainable):,} LoRA parameters; losses {[round(v, 3) for v in losses]}")
    if not cuda:
        print("CPU smoke test passed (no memory figures on the CPU)")
        return
    peak = torch.cuda.max_memory_allocated()  # since the reset after building: the model is included
    row = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "python": platform.python_version(),
           "versions": {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")},
           "shape": args.shape, "params": params, "batch_size": 1, "seq_len": args.seq_len, "lora_r": args.lora_r,
           "trainable": sum(p.numel() for p in trainable), "build_seconds": round(build_s, 1),
           "weights_bytes": weights_bytes, "peak_bytes": peak, "step_seconds": [round(t, 3) for t in times],
           "losses": losses, "predicted_bytes": ledger.total, "predicted": ledger.as_dict(),
           "error": round(ledger.total / peak - 1, 4)}
    print(f"weights + LoRA + optimizer {weights_bytes / 1e9:.2f} GB; peak {peak / 1e9:.2f} GB "
          f"(ledger {ledger.total / 1e9:.2f} GB, {row['error']:+.1%}); under 48 GB: {peak < 48e9}; "
          f"step {min(times):.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1, default=list))


if __name__ == "__main__":
    main()
