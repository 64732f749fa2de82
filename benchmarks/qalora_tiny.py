"""QA-LoRA against LoRA on 4-bit bases, trained on the embedded model, then merged: what the notebook needs.

    python benchmarks/qalora_tiny.py [--steps 50] [--seeds 0 1 2] [--lr-lora 6e-3] [--lr-qalora 6e-3]
                                     [--n-test 100] [--group-size 64] [--arms ...]
                                     [--out benchmarks/cpu/qalora_tiny.json]

Every block projection of the tiny model (42 layers), r=8, alpha=16, the "to_dict" task, batches of 16,
`--steps` AdamW steps (5 warm-up, then linear decay), the same batches for every arm of a seed:

    QA-LoRA     apply_qalora: INT4 asymmetric RTN groups of L = `--group-size`, A (8 x in/L); merged:
                merge_qalora (the same codes, float32 zero points)
    LoRA-INT4   LoRA on the same INT4 RTN base (weights dequantized); merged: W_hat + s B A re-quantized
                to INT4 RTN groups of L (merging.merge_lora_requantized)
    LoRA-NF4    LoRA on an NF4 base (blocks of 64, dequantized); merged: re-quantized to NF4

Each arm reports exact match and the answer tokens' mean loss on `--n-test` test examples before and after
merging (the loss is the finer measure: a merge can move it without flipping a greedy answer), the max
|logit| change the merge causes on 16 test prompts, trainable parameters and training seconds (a shared
CPU: seconds are indicative). The seed changes the adapters' initialisation and the batch order. The record is
written with qlearn.experiment.record, so a notebook can read it with load_record.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import qlearn
from qlearn import experiment, lora, merging, qalora, tasks, train
from qlearn.modules import count_trainable
from qlearn.quant import nf4, quantize

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = ("QA-LoRA", "LoRA-INT4", "LoRA-NF4")


@torch.no_grad()
def quantized_base(base, kind: str, group_size: int):
    """A copy of `base` whose block projections hold their INT4-RTN or NF4 values (simulated, dequantized)."""
    model = copy.deepcopy(base)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            state = (quantize(m.weight, 4, symmetric=False, group_size=group_size) if kind == "int4"
                     else nf4.quantize_nf4(m.weight, 64))
            m.weight.copy_(state.dequantize())
    return model


def build(base, arm: str, group_size: int):
    if arm == "QA-LoRA":
        return qalora.apply_qalora(copy.deepcopy(base), r=8, alpha=16, bits=4, group_size=group_size,
                                   target_modules=TARGETS)
    kind = "int4" if arm == "LoRA-INT4" else "nf4"
    return lora.apply_lora(quantized_base(base, kind, group_size), TARGETS, r=8, alpha=16)


def merge(model, arm: str, group_size: int):
    if arm == "QA-LoRA":
        return qalora.merge_qalora(model)
    if arm == "LoRA-INT4":
        return merging.merge_lora_requantized(model, "rtn", 4, group_size)
    return merging.merge_lora_requantized(model, "nf4", 4, 64)


@torch.no_grad()
def answer_loss(model, scored) -> float:
    """Mean cross-entropy of the answer tokens (labels != -100) of the scored test examples."""
    return model(**scored).loss.item()


def run(base, tok, arm: str, seed: int, steps: int, lr: float, n_test: int, probe, scored,
        group_size: int) -> dict:
    qlearn.seed_everything(seed)
    model = build(base, arm, group_size)
    n_train = count_trainable(model)
    t0 = time.perf_counter()
    losses = train.fit(model, tasks.batches(tok, "to_dict", 16, seed=seed), steps=steps, lr=lr, warmup=5,
                       schedule="linear", seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits = model(**probe).logits
    acc, loss = tasks.evaluate(model, tok, "to_dict", n=n_test), answer_loss(model, scored)
    merged = merge(model, arm, group_size)
    with torch.no_grad():
        change = (merged(**probe).logits - logits).abs().max().item()
    acc_merged, loss_merged = tasks.evaluate(merged, tok, "to_dict", n=n_test), answer_loss(merged, scored)
    row = {"arm": arm, "seed": seed, "lr": lr, "group_size": group_size, "trainable": n_train,
           "loss_first": losses[0], "loss_last": losses[-1], "seconds": seconds, "acc": acc,
           "acc_merged": acc_merged, "answer_loss": loss, "answer_loss_merged": loss_merged,
           "merge_logit_change": change, "logit_range": logits.abs().max().item()}
    print(f"{arm:<10} seed {seed}: {n_train:>7,} trainable, loss {losses[0]:.2f} -> {losses[-1]:.3f} in "
          f"{steps} steps ({seconds:.0f} s), exact match {acc:.0%} unmerged, {acc_merged:.0%} merged, answer "
          f"loss {loss:.4f} -> {loss_merged:.4f}, merge moved logits by up to {change:.2e}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--lr-lora", type=float, default=6e-3)
    parser.add_argument("--lr-qalora", type=float, default=6e-3)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--group-size", type=int, default=64)  # INT4 groups of QA-LoRA and LoRA-INT4
    parser.add_argument("--threads", type=int, default=1)  # 2 threads on a busy 2-core machine spin
    parser.add_argument("--out", default="benchmarks/cpu/qalora_tiny.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = qlearn.load_model("tiny")
    base.requires_grad_(False)
    probe = tasks.encode(tok, tasks.load("to_dict").test[:16])
    scored = tasks.encode(tok, tasks.load("to_dict").test[:args.n_test])  # the answer loss's examples
    rows = [run(base, tok, arm, seed, args.steps, args.lr_qalora if arm == "QA-LoRA" else args.lr_lora,
                args.n_test, probe, scored, args.group_size)
            for seed in args.seeds for arm in args.arms]
    spreads = {}
    for arm in args.arms:
        mine = [r for r in rows if r["arm"] == arm]
        spreads[arm] = experiment.Spread(tuple(r["acc"] for r in mine), f"{arm} unmerged", percent=True)
        spreads[arm + " merged"] = experiment.Spread(tuple(r["acc_merged"] for r in mine), f"{arm} merged",
                                                     percent=True)
        spreads[arm + " loss"] = experiment.Spread(tuple(r["answer_loss"] for r in mine),
                                                   f"{arm} answer loss")
        spreads[arm + " merged loss"] = experiment.Spread(tuple(r["answer_loss_merged"] for r in mine),
                                                          f"{arm} merged answer loss")
        print(spreads[arm], "|", spreads[arm + " merged"])
        print(spreads[arm + " loss"], "|", spreads[arm + " merged loss"])
    for arm in args.arms:
        print(experiment.verdict(spreads[arm], spreads[arm + " merged"]).text)
        print(experiment.verdict(spreads[arm + " loss"], spreads[arm + " merged loss"],
                                 higher_is_better=False).text)
        gaps = [r["answer_loss_merged"] - r["answer_loss"] for r in rows if r["arm"] == arm]
        print(f"{arm}: the merge changed the answer loss by {min(gaps):+.4f}..{max(gaps):+.4f} (per seed)")
    experiment.record(args.out, spreads, rows=rows, command="python benchmarks/qalora_tiny.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out"), torch=torch.__version__)


if __name__ == "__main__":
    main()
