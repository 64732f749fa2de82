"""Pretrain the embedded model: a small Llama (transformers.LlamaForCausalLM) on the corpus.

Shape: hidden 256, 6 layers, 4 heads of 64, SwiGLU MLP 768, vocabulary 8192, context 512 (trained
on 256), untied input and output embeddings: 9.3M parameters, 18.7 MB in bf16.
Recipe: AdamW (0.9, 0.95), weight decay 0.1, peak learning rate 2e-3 with 200 warm-up steps and
cosine decay to 10%, batches of 64 x 256 tokens drawn at random offsets (seeded), bf16 autocast on a
GPU with fp32 master weights; validation loss every 250 steps and the best checkpoint kept.
Saved in Hugging Face format (config.json, generation_config.json, model.safetensors in bf16) so
`from_pretrained` and `BitsAndBytesConfig` work on it exactly as on a hub model.

    python scripts/pretrain.py --data .scratch/corpus --out data/tiny [--steps 2500]

Needs the token files of scripts/train_tokenizer.py; runs on a CPU too (hours instead of minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CONFIG = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)


def batches(tokens: np.ndarray, batch: int, seq: int, gen: torch.Generator):
    starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=gen).numpy()
    x = np.stack([tokens[s: s + seq + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x)  # (B, T+1)


def next_token_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting x[:, 1:] from x[:, :-1]; x is (B, T+1)."""
    logits = model(x[:, :-1]).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())


@torch.no_grad()
def val_loss(model, tokens: np.ndarray, seq: int, device, max_windows: int = 200) -> float:
    model.eval()
    n = min(max_windows, (len(tokens) - 1) // seq)
    x = torch.from_numpy(tokens[: n * seq + 1].astype(np.int64))
    losses = []
    for i in range(0, n, 32):
        idx = torch.arange(i, min(i + 32, n))
        chunk = torch.stack([x[j * seq: j * seq + seq + 1] for j in idx]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = next_token_loss(model, chunk)
        losses.append(loss.item() * len(idx))
    model.train()
    return sum(losses) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(".scratch/corpus"))
    ap.add_argument("--out", type=Path, default=Path("data/tiny"))
    ap.add_argument("--tokenizer", type=Path, default=Path("data/tiny"))
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = np.fromfile(args.data / "train.bin", dtype=np.uint16)
    val = np.fromfile(args.data / "val.bin", dtype=np.uint16)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    warmup = 200

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    log, best, best_state = [], float("inf"), None
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        xb = batches(train, args.batch, args.seq, gen).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = next_token_loss(model, xb)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 250 == 0 or step + 1 == args.steps:
            vl = val_loss(model, val, args.seq, device)
            elapsed = time.perf_counter() - t0
            log.append({"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss": round(vl, 4),
                        "val_ppl": round(math.exp(vl), 2), "seconds": round(elapsed, 1)})
            print(log[-1], flush=True)
            if vl < best:
                best = vl
                best_state = {k: v.detach().to("cpu", torch.bfloat16).clone() for k, v in model.state_dict().items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_seen = args.steps * args.batch * args.seq
    model.load_state_dict(best_state)
    model = model.to("cpu", torch.bfloat16)
    model.generation_config.pad_token_id = CONFIG["pad_token_id"]
    model.save_pretrained(args.out, safe_serialization=True)
    tok = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    samples = []
    for prompt in ["The list type", "To open a file", "A generator is"]:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        samples.append(tok.decode(out[0], skip_special_tokens=True))
    report = {"parameters": n_params, "steps": args.steps, "batch": args.batch, "seq": args.seq,
              "tokens_seen": tokens_seen, "train_tokens": int(train.size), "seconds": round(seconds, 1),
              "tokens_per_second": round(tokens_seen / seconds), "best_val_loss": round(best, 4),
              "best_val_ppl": round(math.exp(best), 2), "device": torch.cuda.get_device_name() if
              device.type == "cuda" else platform.processor(), "torch": torch.__version__,
              "log": log, "greedy_samples": samples}
    (args.out / "train_log.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
