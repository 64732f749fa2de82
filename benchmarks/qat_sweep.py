"""QAT against the strongest post-training quantization on the course's language model, over seeds and
calibration draws, at equal bits and equal stored bits per parameter (notebook 05, section 3).

    python benchmarks/qat_sweep.py [--out benchmarks/cpu/qat_sweep.json]
    # or split in four processes, then merged (what made the committed record):
    python benchmarks/qat_sweep.py --bits 4 --part ptq --out /tmp/qat_4_ptq.json   (and 4 qat, 3 ptq, 3 qat)
    python benchmarks/qat_sweep.py --merge /tmp/qat_*.json

The model is data/tiny in float32 (one CPU thread); every linear layer of the transformer blocks is
quantized, lm_head and the embeddings stay in float32. The yardstick is `qlearn.perplexity(model, tok)`
with its defaults (the first 8192 tokens of data/val.txt, windows of 256). The rest of data/val.txt, cut
in windows of 128 tokens (329 windows, 42k tokens), is the only other text: calibration for GPTQ/AWQ and
training text for QAT.

One grid for every method: asymmetric, groups of 64 input features, an fp16 scale and zero point per
group (bits + 32/64 bits per parameter: 4.5 and 3.5, asserted equal from the states):
- RTN: round to nearest (no data; deterministic).
- GPTQ and AWQ (quantize_model's defaults: GPTQ percdamp 0.01, no act-order; AWQ n_grid 20 with its
  clipping search), each over DRAWS calibration draws: CALIB windows drawn at random from the 329
  (draw d: torch.randperm with a generator seeded d), 8192 tokens.
- QAT: prepare_qat(..., group_size=64, symmetric=False), self-distillation (KL(teacher || student) of
  the next-token distributions, teacher = the float model), AdamW (weight decay 0), constant lr, batches
  of BATCH windows drawn at random (seed s: a generator seeded s), over SEEDS seeds; perplexity of the
  converted model after each of STEPS, at one lr (LR, not tuned). Notebook 05's qat_finetune is the
  same loop.
And for reference RTN on the simple grid (symmetric, one scale per output channel).

The JSON holds one Spread per configuration (qlearn.experiment.record) and in its meta the command,
the budgets (steps, tokens, calibration tokens, lr), CPU seconds per method and the versions.
About 7 CPU-minutes on a 2-core AVX2 machine (one thread). The budgets are cut to fit a shared machine
(3 draws, 3 seeds, at most 40 QAT steps, no lr sweep): the QAT curve has not converged at 40 steps.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

import qlearn
from qlearn import experiment
from qlearn.env import cpu_name
from qlearn.evaluate import token_windows
from qlearn.quant import convert, prepare_qat, quantize_copy

BITS = (4, 3)
GROUP = 64
DRAWS = (0, 1, 2)  # calibration draws for GPTQ and AWQ
SEEDS = (0, 1, 2)  # batch orders for QAT
STEPS = (20, 40)  # QAT checkpoints (perplexity measured after each)
LR = 1e-4  # not tuned: notebook 05's lr (an lr sweep did not fit the shared machine's budget)
BATCH, SEQ, CALIB = 4, 128, 64
EVALUATED = 8192 // SEQ  # perplexity() reads the first 8192 tokens: the first 64 windows of 128
OUT = Path(__file__).parent / "cpu" / "qat_sweep.json"


def setup(model_name: str = "tiny"):
    """(float32 model, tokenizer, fine-tuning windows): the windows after the evaluated tokens, (329, 128)."""
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    model, tok = qlearn.load_model(model_name, device="cpu", dtype=torch.float32)
    windows = token_windows(tok, seq_len=SEQ, max_tokens=10**7)  # all of data/val.txt, (n, 128)
    return model, tok, windows[EVALUATED:]


def calib_draw(train_windows: torch.Tensor, draw: int) -> list[torch.Tensor]:
    """CALIB windows drawn at random (without replacement) from the fine-tuning windows."""
    order = torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(draw))
    return list(train_windows[order[:CALIB]])


def ptq(model, tok, method: str, bits: int, calib=None, group_size: int | None = GROUP,
        symmetric: bool = False) -> tuple[float, float]:
    """(perplexity, bits per parameter) of a quantized copy of `model`."""
    q = quantize_copy(model, method, bits, group_size, calib=calib, symmetric=symmetric)
    return qlearn.perplexity(q, tok), q.quant_report.bits_per_param


def distill_loss(student: nn.Module, teacher: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per token over the next-token distributions."""
    with torch.no_grad():
        target = teacher(batch).logits.float().log_softmax(-1)  # (B, T, V)
    logp = student(batch).logits.float().log_softmax(-1)
    return nn.functional.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")


def qat_curve(model, tok, train_windows, bits: int, lr: float, steps: tuple[int, ...], seed: int):
    """QAT of a copy of `model` on the grid above; {step: perplexity of the converted model} and the CPU
    seconds of the training steps alone (evaluations excluded)."""
    student = prepare_qat(copy.deepcopy(model), bits, symmetric=False, group_size=GROUP)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    curve, seconds = {}, 0.0
    for step in range(1, max(steps) + 1):
        t = time.process_time()
        student.train()
        batch = train_windows[torch.randint(len(train_windows), (BATCH,), generator=gen)]
        loss = distill_loss(student, model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds += time.process_time() - t
        if step in steps:
            converted = convert(copy.deepcopy(student).eval())
            curve[step] = qlearn.perplexity(converted, tok)
            assert converted.quant_report.bits_per_param == bits + 32 / GROUP
            print(f"  QAT {bits} bits lr {lr:g} seed {seed} step {step}: {curve[step]:.3f}", flush=True)
    return curve, seconds


def run_ptq(model, tok, train_windows, bits: int, spreads: dict, bpp: dict, seconds: dict) -> None:
    for label, method, kwargs in (("rtn_sym_channel", "rtn", {"group_size": None, "symmetric": True}),
                                  ("rtn", "rtn", {})):
        value, bpp[f"{label}_{bits}"] = ptq(model, tok, method, bits, **kwargs)
        spreads[f"{label}_{bits}"] = experiment.Spread((value,), f"{label} {bits} bits")
    for method in ("gptq", "awq"):
        values, t = [], time.process_time()
        for draw in DRAWS:
            value, bpp[f"{method}_{bits}"] = ptq(model, tok, method, bits, calib_draw(train_windows, draw))
            values.append(value)
            print(f"  {method} {bits} bits draw {draw}: {value:.3f}", flush=True)
        seconds[f"{method}_run"] = (time.process_time() - t) / len(DRAWS)  # calibration + quantization + 1 perplexity
        spreads[f"{method}_{bits}"] = experiment.Spread(tuple(values), f"{method.upper()} {bits} bits")


def run_qat(model, tok, train_windows, bits: int, spreads: dict, bpp: dict, seconds: dict) -> None:
    curves, step_seconds = [], []
    for seed in SEEDS:
        curve, t = qat_curve(model, tok, train_windows, bits, LR, STEPS, seed)
        curves.append(curve)
        step_seconds.append(t / max(STEPS))
    for step in STEPS:
        spreads[f"qat_{bits}_{step}"] = experiment.Spread(tuple(c[step] for c in curves), f"QAT {bits} bits {step} steps")
    bpp[f"qat_{bits}"] = bits + 32 / GROUP
    seconds["qat_step"] = sum(step_seconds) / len(step_seconds)


def _meta(bpp: dict, seconds: dict, command: str) -> dict:
    return {
        "command": command,
        "model": "data/tiny (float32), every nn.Linear of the blocks quantized, lm_head and embeddings float32",
        "yardstick": "qlearn.perplexity(model, tok) defaults: first 8192 tokens of data/val.txt, windows of 256",
        "grid": f"asymmetric, groups of {GROUP}, fp16 scale + zero point per group (bits + 0.5 bits/param)",
        "bits_per_param": bpp,
        "ptq": {"draws": list(DRAWS), "calib_windows": CALIB, "calib_tokens": CALIB * SEQ,
                "gptq": "percdamp 0.01, no act-order", "awq": "n_grid 20, clipping search"},
        "qat": {"seeds": list(SEEDS), "steps": list(STEPS), "batch": f"{BATCH} x {SEQ} tokens", "lr": LR,
                "optimizer": "AdamW, weight decay 0, constant lr", "loss": "KL(float teacher || student) per token",
                "tokens_per_step": BATCH * SEQ, "trains": "every parameter (weights through fake quantization)",
                "lr_tuned": False},
        "cpu_seconds": dict(seconds, note="process time, one thread; GPTQ/AWQ runs include one perplexity evaluation"),
        "machine": {"processor": cpu_name(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "qlearn": qlearn.__version__, "threads": torch.get_num_threads()},
    }


SPLIT = ("python benchmarks/qat_sweep.py --bits B --part P --out PART (B in 4 3, P in ptq qat, four processes); "
         "python benchmarks/qat_sweep.py --merge PART...")


def merge(parts: list[Path], out: Path) -> dict:
    """One record from the records of split runs (--bits/--part): their spreads, bits per parameter and CPU
    seconds (the mean over the parts that measured each)."""
    spreads, bpp, seconds = {}, {}, {}
    for path in parts:
        part_spreads, meta = experiment.load_record(path)
        spreads.update(part_spreads)
        bpp.update(meta["bits_per_param"])
        for key, value in meta["cpu_seconds"].items():
            if key != "note":
                seconds.setdefault(key, []).append(value)
    seconds = {k: sum(v) / len(v) for k, v in seconds.items()}
    assert all(bpp[f"{m}_{b}"] == b + 0.5 for b in BITS for m in ("rtn", "gptq", "awq", "qat")), bpp
    return experiment.record(out, spreads, **_meta(bpp, seconds, SPLIT))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--bits", type=int, choices=BITS, help="one width only (default: both)")
    parser.add_argument("--part", choices=("ptq", "qat"), help="one half only (default: both)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="PART", help="merge split runs into --out")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    model, tok, train_windows = setup()
    spreads, seconds, bpp = {}, {}, {}
    spreads["fp32"] = experiment.Spread((qlearn.perplexity(model, tok),), "float32")
    for bits in (args.bits,) if args.bits else BITS:
        if args.part in (None, "ptq"):
            run_ptq(model, tok, train_windows, bits, spreads, bpp, seconds)
        if args.part in (None, "qat"):
            run_qat(model, tok, train_windows, bits, spreads, bpp, seconds)
    if args.bits is None and args.part is None:
        assert all(bpp[f"{m}_{b}"] == b + 0.5 for b in BITS for m in ("rtn", "gptq", "awq", "qat")), bpp
    return experiment.record(args.out, spreads, **_meta(bpp, seconds, "python benchmarks/qat_sweep.py"))


if __name__ == "__main__":
    main()
