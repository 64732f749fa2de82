"""What DoRA (and QA-LoRA) cost against LoRA on the CPU: a training step, an inference forward, peak memory.

    python benchmarks/dora_cost.py [--threads 1] [--rounds 10] [--out benchmarks/cpu/dora_cost.json]

The embedded tiny model, every projection adapted (r=8, alpha=16), a batch of 16 "to_dict" examples.
qlearn's LoRALinear with use_dora=False/True, PEFT's LoraConfig(use_dora=False/True) and qlearn's QA-LoRA
(INT4 RTN groups of 32, W_hat dequantized once and kept), each on a fresh copy of the model. A training
step is forward + backward + AdamW step; the inference forward runs in eval mode under no_grad. Medians of
`--rounds` rounds after one warm-up, the five variants interleaved in every round, so that a shared
machine slows them alike; one thread, as two threads on a busy 2-core machine spin and slow everything
several-fold. The peak is qlearn.memory.peak_memory of one training step (the CPU profiler's allocations,
above what was allocated before). DoRA's extra work per layer and step: the weight norm ||W + s B A|| (a
product B A, an (out x in) sum, a norm per row) and the extra (m / n - 1) W x term, saved for the
backward; PEFT computes the same (tests/test_lora_variants.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import qlearn
from qlearn import lora, qalora, tasks
from qlearn.env import cpu_name
from qlearn.memory import peak_memory
from qlearn.modules import count_trainable

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def trainer(model, batch):
    """One training step of `model` (forward + backward + AdamW) as a function."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    return step


def forwarder(model, batch):
    """One inference forward of `model` (eval, no_grad) as a function."""

    def forward():
        model.eval()
        with torch.no_grad():
            model(**batch)

    return forward


def measure(models: dict, batch, rounds: int) -> dict:
    """Median seconds of a training step and of a forward, the variants interleaved round by round (so that
    a busy machine slows them alike), and the peak memory of one training step."""
    steps = {name: trainer(m, batch) for name, m in models.items()}
    forwards = {name: forwarder(m, batch) for name, m in models.items()}
    for fn in [*steps.values(), *forwards.values()]:  # warm-up
        fn()
    times = {name: {"train_step_s": [], "forward_s": []} for name in models}
    for _ in range(rounds):
        for name in models:
            times[name]["train_step_s"].append(seconds(steps[name]))
            times[name]["forward_s"].append(seconds(forwards[name]))
    return {name: {"train_step_s": statistics.median(t["train_step_s"]),
                   "forward_s": statistics.median(t["forward_s"]), "peak_bytes": peak_memory(steps[name]),
                   "trainable": count_trainable(models[name]), "train_step_all_s": t["train_step_s"]}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/cpu/dora_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = qlearn.load_model("tiny")
    base.requires_grad_(False)
    batch = next(tasks.batches(tok, "to_dict", 16, seed=0))
    makers = {
        "qlearn LoRA": lambda m: lora.apply_lora(m, TARGETS, r=8, alpha=16),
        "qlearn DoRA": lambda m: lora.apply_lora(m, TARGETS, r=8, alpha=16, use_dora=True),
        "PEFT LoRA": lambda m: get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)),
        "PEFT DoRA": lambda m: get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                             use_dora=True)),
        "qlearn QA-LoRA": lambda m: qalora.apply_qalora(m, r=8, alpha=16, group_size=32,
                                                        target_modules=TARGETS),
    }
    models = {}
    for name, make in makers.items():
        qlearn.seed_everything(0)
        models[name] = make(copy.deepcopy(base))
    rows = measure(models, batch, args.rounds)
    for name, r in rows.items():
        print(f"{name:<14} trainable {r['trainable']:>8,}  train step {1e3 * r['train_step_s']:7.1f} ms  "
              f"forward {1e3 * r['forward_s']:6.1f} ms  peak {r['peak_bytes'] / 2**20:6.1f} MiB", flush=True)
    for who in ("qlearn", "PEFT"):
        lo, do = rows[f"{who} LoRA"], rows[f"{who} DoRA"]
        print(f"{who}: DoRA / LoRA  train step x{do['train_step_s'] / lo['train_step_s']:.2f}, forward "
              f"x{do['forward_s'] / lo['forward_s']:.2f}, peak x{do['peak_bytes'] / lo['peak_bytes']:.2f}")
    lo, qa = rows["qlearn LoRA"], rows["qlearn QA-LoRA"]
    print(f"qlearn: QA-LoRA / LoRA  train step x{qa['train_step_s'] / lo['train_step_s']:.2f}, forward "
          f"x{qa['forward_s'] / lo['forward_s']:.2f}, peak x{qa['peak_bytes'] / lo['peak_bytes']:.2f}")
    meta = {"command": f"python benchmarks/dora_cost.py --threads {args.threads} --rounds {args.rounds}",
            "machine": platform.machine(),
            "processor": cpu_name(), "threads": args.threads, "torch": torch.__version__,
            "batch": "16 to_dict examples", "targets": TARGETS, "r": 8, "alpha": 16}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
