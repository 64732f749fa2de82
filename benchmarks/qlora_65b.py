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

It then runs `--steps` optimizer steps on random tokens (batch 1 x 512), the forward under bf16
autocast as Trainer/TRL with bf16=True run it (`--no-autocast` for the variant), all of it under an
allocator cap: torch.cuda.set_per_process_memory_fraction(46 GiB / the card's memory) before anything
is allocated, so torch's caching allocator cannot reserve more than 46 GiB and the step fails with an
out-of-memory error if it needs more. That run is the proof of "fits a 48 GB card": the CUDA context
(measured, ~0.5 GiB) is outside the cap, and so are the paged optimizer states (CUDA unified memory,
allocated by bitsandbytes, not by torch; their bytes are counted from the optimizer's state).
Recorded, like for like: torch.cuda.max_memory_allocated (and max_memory_reserved) against the ledger
without its paged optimizer states; allocated + paged states against the whole ledger; and what the
device reports in use (cudaMemGetInfo: context + reserved + resident paged pages) at the end.
`--shape tiny --device cpu` runs the same code on the course's model shape as a smoke test (no memory
figures: the CPU has no allocator statistics this script reads).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing qlearn

from qlearn import gpu_lab, memory  # noqa: E402

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


def paged_state_bytes(opt) -> int:
    """Bytes of the optimizer's state tensors that live in CUDA unified memory (bitsandbytes' paged states)."""
    return sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
               if torch.is_tensor(t) and getattr(t, "is_paged", False))


def ledger_for(args, autocast: bool):
    """memory.estimate for the run's configuration (autocast if the ledger models it)."""
    kwargs = dict(batch_size=1, seq_len=args.seq_len, lora_r=args.lora_r, grad_checkpointing=True,
                  optimizer="paged_adamw_8bit")
    if autocast:
        try:
            return memory.estimate(args.shape, "qlora", autocast=True, **kwargs)
        except TypeError:  # a ledger without the autocast option
            pass
    return memory.estimate(args.shape, "qlora", **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-65b", choices=sorted(memory.LLAMA_SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--memory-cap-gib", type=float, default=46.0, help="torch's allocator cap (0: none)")
    ap.add_argument("--no-autocast", dest="autocast", action="store_false", help="the forward without bf16 autocast")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu" / "qlora_65b.json")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --shape tiny --device cpu for a smoke test)")
    config = llama_config(args.shape)
    row = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "command": "python " + " ".join(sys.argv),
           "shape": args.shape, "batch_size": 1, "seq_len": args.seq_len, "lora_r": args.lora_r, "autocast": args.autocast,
           "memory_cap_bytes": int(args.memory_cap_gib * 2**30) if cuda and args.memory_cap_gib else None}
    if cuda:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        row |= {"device": torch.cuda.get_device_name(), "device_total_bytes": total,
                "context_bytes": total - free,  # the CUDA context (and anything else on the card) before torch allocates
                "versions": {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")}}
        if args.memory_cap_gib:
            torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total)
        torch.cuda.reset_peak_memory_stats()
        print(f"{row['device']}: {total / 2**30:.1f} GiB, context {row['context_bytes'] / 2**30:.2f} GiB, "
              f"allocator cap {args.memory_cap_gib} GiB", flush=True)
    ledger = ledger_for(args, args.autocast)
    row |= {"predicted_bytes": ledger.total, "predicted": ledger.as_dict(),
            "predicted_unpaged_bytes": ledger.total - ledger.optimizer}  # what the allocator should see
    try:
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
            torch.cuda.synchronize()
            row |= {"build_peak_bytes": torch.cuda.max_memory_allocated(), "weights_bytes": torch.cuda.memory_allocated()}
            torch.cuda.reset_peak_memory_stats()
        else:
            opt = torch.optim.AdamW(trainable, lr=2e-4)
        row |= {"params": params, "trainable": sum(p.numel() for p in trainable), "build_seconds": round(build_s, 1)}
        print(f"{args.shape}: {params / 1e9:.2f}B parameters built and quantized in {build_s:.0f} s; "
              f"{row['trainable']:,} LoRA parameters", flush=True)
        times, losses = gpu_lab.train_steps(model, opt, steps=args.steps, batch_size=1, seq_len=args.seq_len,
                                            device=device, autocast=args.autocast)
        assert all(torch.isfinite(torch.tensor(losses))), losses
        row |= {"step_seconds": [round(t, 3) for t in times], "losses": losses, "completed": True}
    except torch.OutOfMemoryError as err:  # under the cap: the answer is "does not fit"
        row |= {"completed": False, "error": f"OutOfMemoryError: {str(err)[:400]}",
                "trace": traceback.format_exc(limit=4)}
        print(f"out of memory under the {args.memory_cap_gib} GiB cap: {str(err)[:200]}", flush=True)
        opt = None
    if not cuda:
        print(f"losses {[round(v, 3) for v in row['losses']]}\nCPU smoke test passed (no memory figures on the CPU)")
        return
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    paged = paged_state_bytes(opt) if opt is not None else 0
    row |= {"peak_bytes": peak,  # since the reset after building: the model is included
            "peak_reserved_bytes": reserved, "paged_state_bytes": paged, "device_used_bytes_at_end": total - free,
            "error_unpaged": round(row["predicted_unpaged_bytes"] / peak - 1, 4),
            "error_with_paged": round(ledger.total / (peak + paged) - 1, 4),
            # a "48 GB" card (RTX A6000, L40S) has 48 GiB; what the device holds: context and libraries,
            # torch's reserved pool (kept until empty_cache, so at the end it is still its peak), paged states
            "fits_48GB": bool(row["completed"] and max(total - free, reserved + paged + row["context_bytes"]) < 48 * 2**30),
            "fits_48GB_rule": "completed under the cap and max(device in use at the end, peak reserved + paged states "
                              "+ context) < 48 GiB"}
    print(f"peak allocated {peak / 2**30:.2f} GiB (ledger without paged states {row['predicted_unpaged_bytes'] / 2**30:.2f} "
          f"GiB, {row['error_unpaged']:+.1%}); + paged states {paged / 2**30:.2f} GiB = {(peak + paged) / 2**30:.2f} GiB "
          f"(whole ledger {ledger.total / 2**30:.2f} GiB, {row['error_with_paged']:+.1%}); peak reserved "
          f"{reserved / 2**30:.2f} GiB under the {args.memory_cap_gib} GiB cap; device in use at the end "
          f"{(total - free) / 2**30:.2f} GiB; completed: {row['completed']}; fits 48 GB: {row['fits_48GB']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1, default=list))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
