"""QLoRA against LoRA, k-bit bases and LoftQ's init, over seeds, on the course's model (notebook 07).

    python benchmarks/qlora_vs_lora.py [--part all|headline|kbit] [--seeds 0 1 2] [--out FILE]
    python benchmarks/qlora_vs_lora.py --combine h0.json h1.json k1.json     # records made in parallel

The model is data/tiny in float32 on the CPU, one thread; the task is "to_dict" (1,200 training examples,
the whole 200-example test split scored). Every run: r = 8, alpha = 16 (scaling 2) on the 7 projections of
every block, qlearn.train.fit with AdamW, batches of 8, 5 warmup steps then a linear decay to 0, no
dropout. Seed s sets the adapters' random init (seed_everything(s) before they are built) and the order of
the training batches (tasks.batches(seed=s)); everything else is fixed.

1. headline (QLoRA paper, Sec. 4, Tables 3-4: 4-bit NF4 + DQ QLoRA matches 16-bit LoRA): PEFT's LoRA on
   the float32 base against PEFT's LoRA on `qlearn.load_model("tiny", quantization="nf4")` (bitsandbytes
   NF4, blocks of 64, double quantization; float32 compute on the CPU, see qlearn.models) after
   `prepare_model_for_kbit_training(use_gradient_checkpointing=False)`. HEADLINE_STEPS steps at HEADLINE_LR,
   the same for both, SEEDS seeds (3: five did not fit the time on a loaded shared CPU). Scores: exact match
   of greedy decoding on the 200 test examples, and the answer loss / answer-token accuracy (one
   teacher-forced pass). The per-step losses go in the meta. `--seeds k --out FILE` runs some seeds in a
   separate process; `--combine` merges such files in seed order (and k-bit files made with --configs).
2. kbit: qlearn's LoRA on bases quantized by qlearn.quant.quantize_model (simulated: the weights hold the
   dequantized values) with RTN, HQQ, GPTQ (asymmetric integer groups of 64) and NF4 (blocks of 64), and
   LoftQ's init (qlearn.lora init="loftq", 5 alternations: NF4 at 4 bits, RTN groups of 64 at 2 bits, the
   same quantizer as rtn2), against the float32 base; KBIT_STEPS steps at KBIT_LR, KBIT_SEEDS seeds. Scores:
   the answer loss and answer-token accuracy on the 200 test examples after training, and at the init
   (step 0) the perplexity of base + adapter on 1,024 validation tokens and the answer loss (deterministic:
   one run). GPTQ is calibrated on 8 windows of 128 validation tokens from the end of data/val.txt (away from
   the scored ones). The configurations run in the order of KBIT (priority) and the record is saved after
   each, so a run cut short keeps the finished ones (the meta's "configs" lists them).

The JSON (qlearn.experiment.record) holds one Spread per configuration and score, and in its meta the
command, the budgets, the loss curves, CPU seconds per run and the machine. Each part merges its results
into the file. About 50 CPU-seconds per headline run and 17 per k-bit run on a 2-core AVX2 EPYC.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from torch.nn import functional as F

import qlearn
from qlearn import experiment, lora, tasks, train
from qlearn.env import cpu_name
from qlearn.evaluate import token_windows
from qlearn.quant import quantize_model

TASK, BATCH, R, ALPHA = "to_dict", 8, 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCHEDULE = {"warmup": 5, "schedule": "linear"}
HEADLINE_STEPS, HEADLINE_LR, SEEDS = 80, 6e-3, (0, 1, 2)  # 3 seeds: 5 did not fit the time on a loaded CPU
KBIT_STEPS, KBIT_LR, KBIT_SEEDS = 40, 6e-3, (0, 1, 2)
# (label, method, bits, LoftQ iterations): method None = the float32 base; "loftq" = LoftQ's init on the float
# base (it quantizes the adapted layers itself), every other method = quantize_model, then the default init
KBIT = [("float32", None, None, None), ("rtn2", "rtn", 2, None), ("loftq2_5", "loftq", 2, 5),
        ("rtn4", "rtn", 4, None), ("hqq2", "hqq", 2, None), ("gptq2", "gptq", 2, None), ("nf4", "nf4", 4, None),
        ("loftq4_5", "loftq", 4, 5), ("rtn3", "rtn", 3, None)]  # in order of priority: saved one by one
PPL_TOKENS = 1024
OUT = Path(__file__).parent / "cpu" / "qlora_vs_lora.json"


def setup():
    """(float32 base model, frozen; tokenizer), one thread, library notes silenced."""
    torch.set_num_threads(1)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*requires_grad.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    base, tok = qlearn.load_model("tiny", device="cpu", dtype=torch.float32)
    return base.requires_grad_(False), tok


@torch.no_grad()
def answer_scores(model, tok, examples: list[dict], chunk: int = 50) -> tuple[float, float]:
    """(mean cross-entropy of the answer tokens, fraction of answer tokens that are the top prediction given
    the correct prefix), over all answer tokens of `examples` (teacher forcing, one pass)."""
    was_training = model.training
    model.eval()
    loss_sum, right, count = 0.0, 0, 0
    for i in range(0, len(examples), chunk):
        enc = tasks.encode(tok, examples[i: i + chunk])
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1]
        target = enc["labels"][:, 1:]  # position t predicts token t + 1
        mask = target != tasks.IGNORE  # answer tokens only
        loss_sum += F.cross_entropy(logits[mask].float(), target[mask], reduction="sum").item()
        right += (logits.argmax(-1)[mask] == target[mask]).sum().item()
        count += mask.sum().item()
    model.train(was_training)
    return loss_sum / count, right / count


def fit(model, tok, seed: int, steps: int, lr: float):
    """qlearn.train.fit on the task's batches in the order of `seed` (the budget of the module docstring)."""
    return train.fit(model, tasks.batches(tok, TASK, BATCH, seed=seed), steps=steps, lr=lr, progress=False,
                     **SCHEDULE)


def peft_model(base, seed: int, quantized: bool):
    """PEFT LoRA on a deep copy of the float32 base, or on a freshly loaded NF4 + DQ model (QLoRA)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model, _ = qlearn.load_model("tiny", quantization="nf4", device="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = copy.deepcopy(base)
    qlearn.seed_everything(seed)
    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))


def headline_run(base, tok, method: str, seed: int) -> dict:
    """One LoRA ("lora") or QLoRA ("qlora") run: its scores on the whole test split and its loss curve."""
    test = tasks.load(TASK).test
    model = peft_model(base, seed, quantized=method == "qlora")
    t = time.process_time()
    res = fit(model, tok, seed, HEADLINE_STEPS, HEADLINE_LR)
    seconds = time.process_time() - t
    loss, token_acc = answer_scores(model, tok, test)
    exact = tasks.evaluate(model, tok, TASK, examples=test)
    return {"exact": exact, "answer_loss": loss, "token_acc": token_acc, "curve": list(res), "seconds": seconds}


def calibration(tok) -> list[torch.Tensor]:
    """GPTQ's calibration: the last 8 windows of 128 tokens of the first 8,192 validation tokens."""
    return list(token_windows(tok, seq_len=128, max_tokens=8192)[-8:].unbind())


def kbit_model(base, tok, method, bits, iters, seed: int, calib=None):
    """qlearn LoRA (seeded init) on a copy of the base: quantized by `method`, or LoftQ's init, or float."""
    model = copy.deepcopy(base)
    if method not in (None, "loftq"):
        quantize_model(model, method, bits, group_size=64 if method in ("rtn", "hqq", "gptq") else None,
                       calib=calib if method == "gptq" else None)
    qlearn.seed_everything(seed)
    if method == "loftq":
        return lora.apply_lora(model, TARGETS, r=R, alpha=ALPHA, init="loftq", loftq_bits=bits, loftq_iter=iters)
    return lora.apply_lora(model, TARGETS, r=R, alpha=ALPHA)


def kbit_init(base, tok, label: str, calib) -> dict:
    """Scores at step 0 (base + adapter as initialised; deterministic): perplexity and answer scores."""
    _, method, bits, iters = next(c for c in KBIT if c[0] == label)
    model = kbit_model(base, tok, method, bits, iters, 0, calib)
    loss, token_acc = answer_scores(model, tok, tasks.load(TASK).test)
    return {"ppl": qlearn.perplexity(model, tok, max_tokens=PPL_TOKENS), "answer_loss": loss, "token_acc": token_acc}


def kbit_run(base, tok, label: str, seed: int, calib) -> dict:
    """One k-bit run: scores on the 200 test examples after KBIT_STEPS steps."""
    _, method, bits, iters = next(c for c in KBIT if c[0] == label)
    model = kbit_model(base, tok, method, bits, iters, seed, calib)
    t = time.process_time()
    res = fit(model, tok, seed, KBIT_STEPS, KBIT_LR)
    seconds = time.process_time() - t
    loss, token_acc = answer_scores(model, tok, tasks.load(TASK).test)
    return {"answer_loss": loss, "token_acc": token_acc, "final_loss": res[-1], "seconds": seconds}


def part_headline(base, tok, save, seeds=SEEDS) -> None:
    """LoRA and QLoRA, seed by seed (interleaved); the record is saved after every seed, so a cut run keeps its
    finished seeds."""
    runs = {"lora": [], "qlora": []}
    for i, seed in enumerate(seeds):
        for method in ("lora", "qlora"):
            runs[method].append(headline_run(base, tok, method, seed))
            r = runs[method][-1]
            print(f"  {method} seed {seed}: exact {r['exact']:.3f}, answer loss {r['answer_loss']:.4f}, "
                  f"{r['seconds']:.0f} s", flush=True)
        spreads = {}
        for method, done in runs.items():
            name = "QLoRA" if method == "qlora" else "LoRA"
            spreads[f"headline/{method}/exact"] = experiment.Spread(tuple(r["exact"] for r in done), name, percent=True)
            spreads[f"headline/{method}/answer_loss"] = experiment.Spread(tuple(r["answer_loss"] for r in done), name)
            spreads[f"headline/{method}/token_acc"] = experiment.Spread(tuple(r["token_acc"] for r in done), name,
                                                                        percent=True)
        meta = {"seeds": list(seeds[: i + 1]), "steps": HEADLINE_STEPS, "lr": HEADLINE_LR, "batch": BATCH,
                **SCHEDULE, "r": R, "alpha": ALPHA, "targets": TARGETS, "test_examples": 200,
                "lora": "PEFT LoraConfig on the float32 base",
                "qlora": "PEFT LoraConfig on load_model('tiny', quantization='nf4') (NF4, blocks of 64, double "
                         "quantization, float32 compute on the CPU) after prepare_model_for_kbit_training("
                         "use_gradient_checkpointing=False)",
                "curves": {m: [r["curve"] for r in done] for m, done in runs.items()},
                "cpu_seconds_per_run": {m: sum(r["seconds"] for r in done) / len(done) for m, done in runs.items()}}
        save(spreads, "headline", meta)


def part_kbit(base, tok, save, labels=None) -> None:
    """Every KBIT configuration (or those `labels` name) over KBIT_SEEDS; the record is saved after each."""
    calib = calibration(tok)
    spreads, init, seconds = {}, {}, {}
    for label, method, bits, iters in KBIT:
        if labels is not None and label not in labels:
            continue
        init[label] = kbit_init(base, tok, label, calib)
        runs = []
        for seed in KBIT_SEEDS:
            runs.append(kbit_run(base, tok, label, seed, calib))
            print(f"  {label} seed {seed}: answer loss {runs[-1]['answer_loss']:.4f}, tokens right "
                  f"{runs[-1]['token_acc']:.4f}, {runs[-1]['seconds']:.0f} s", flush=True)
        spreads[f"kbit/{label}/answer_loss"] = experiment.Spread(tuple(r["answer_loss"] for r in runs), label)
        spreads[f"kbit/{label}/token_acc"] = experiment.Spread(tuple(r["token_acc"] for r in runs), label,
                                                               percent=True)
        for key in ("ppl", "answer_loss", "token_acc"):
            spreads[f"kbit/{label}/init_{key}"] = experiment.Spread((init[label][key],), label, key == "token_acc")
        seconds[label] = sum(r["seconds"] for r in runs) / len(runs)
        print(f"  {label}: init perplexity {init[label]['ppl']:.2f}; after:", spreads[f"kbit/{label}/answer_loss"],
              flush=True)
        meta = {"seeds": list(KBIT_SEEDS), "steps": KBIT_STEPS, "lr": KBIT_LR, "batch": BATCH, **SCHEDULE,
                "r": R, "alpha": ALPHA, "targets": TARGETS, "test_examples": 200, "ppl_tokens": PPL_TOKENS,
                "configs": {lb: {"method": m, "bits": b, "loftq_iter": i} for lb, m, b, i in KBIT if lb in seconds},
                "quantizers": "quantize_model: rtn/hqq/gptq asymmetric groups of 64 (fp16 scale + zero point), nf4 "
                              "blocks of 64 (float32 absmax); LoftQ: NF4 blocks of 64 at 4 bits, RTN groups of 64 at "
                              "2 (the same quantizer as rtn2)",
                "gptq_calib": "8 windows of 128 tokens: token_windows(tok, 128, 8192)[-8:]",
                "cpu_seconds_per_run": dict(seconds)}
        save(dict(spreads), "kbit", meta)


def merge(path: Path, spreads: dict, part: str, part_meta: dict) -> dict:
    """Add one part's spreads and meta to the record at `path` (created if missing)."""
    old_spreads, meta = experiment.load_record(path) if path.exists() else ({}, {})
    old_spreads = {k: v for k, v in old_spreads.items() if not k.startswith(part + "/")}
    meta.update({"command": "python benchmarks/qlora_vs_lora.py",
                 "model": "data/tiny (float32), task to_dict, one CPU thread",
                 "machine": {"processor": cpu_name(), "python": sys.version.split()[0], "torch": torch.__version__,
                             "transformers": transformers.__version__, "qlearn": qlearn.__version__,
                             "peft": __import__("peft").__version__,
                             "bitsandbytes": __import__("bitsandbytes").__version__,
                             "threads": torch.get_num_threads()},
                 part: part_meta})
    return experiment.record(path, {**old_spreads, **spreads}, **meta)


def combine(paths: list[Path], out: Path) -> None:
    """Merge records made by separate processes (to use more than one core) into `out`: headline runs made
    with `--seeds k --out FILE` in seed order, as one process would have recorded them; k-bit configurations
    made with `--configs LABEL --out FILE` side by side."""
    parts = [experiment.load_record(p) for p in paths]
    heads = sorted((sm for sm in parts if "headline" in sm[1]), key=lambda sm: sm[1]["headline"]["seeds"])
    if heads:
        metas = [m["headline"] for _, m in heads]
        spreads = {}
        for key, first in heads[0][0].items():
            if key.startswith("headline/"):
                values = tuple(v for sp, _ in heads for v in sp[key].values)
                spreads[key] = experiment.Spread(values, first.label, first.percent)
        runs = lambda m: len(m["seeds"])  # noqa: E731
        meta = {**metas[0], "seeds": [s for m in metas for s in m["seeds"]],
                "curves": {k: [c for m in metas for c in m["curves"][k]] for k in metas[0]["curves"]},
                "cpu_seconds_per_run": {k: sum(m["cpu_seconds_per_run"][k] * runs(m) for m in metas)
                                        / sum(runs(m) for m in metas) for k in metas[0]["cpu_seconds_per_run"]},
                "processes": f"{len(heads)} processes (seed groups), merged by --combine"}
        merge(out, spreads, "headline", meta)
    kbits = [sm for sm in parts if "kbit" in sm[1]]
    if kbits:
        spreads = {k: v for sp, _ in kbits for k, v in sp.items() if k.startswith("kbit/")}
        metas = [m["kbit"] for _, m in kbits]
        meta = {**metas[0], "configs": {k: v for m in metas for k, v in m["configs"].items()},
                "cpu_seconds_per_run": {k: v for m in metas for k, v in m["cpu_seconds_per_run"].items()},
                "processes": f"{len(kbits)} processes (configuration groups), merged by --combine"}
        order = [label for label, *_ in KBIT]
        meta["configs"] = dict(sorted(meta["configs"].items(), key=lambda kv: order.index(kv[0])))
        merge(out, spreads, "kbit", meta)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "headline", "kbit"), default="all")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="headline seeds (default: SEEDS)")
    parser.add_argument("--configs", nargs="+", choices=[c[0] for c in KBIT], help="k-bit labels (default: all)")
    parser.add_argument("--combine", type=Path, nargs="+", help="merge these records into --out and stop")
    args = parser.parse_args(argv)
    if args.combine:
        combine(args.combine, args.out)
        return experiment.load_record(args.out)[0]
    base, tok = setup()
    save = lambda spreads, name, meta: merge(args.out, spreads, name, meta)  # noqa: E731
    if args.part in ("all", "headline"):
        part_headline(base, tok, save, tuple(args.seeds))
    if args.part in ("all", "kbit"):
        part_kbit(base, tok, save, args.configs)
    spreads, _ = experiment.load_record(args.out)
    print(json.dumps({k: v.mean for k, v in spreads.items()}, indent=1))
    return spreads


if __name__ == "__main__":
    main()
