"""Fine-tuning regimes at equal, stated budgets, and LoRA's rank sweep with fixed alpha vs rsLoRA (notebook 06).

    python benchmarks/regimes_sweep.py [--workers 2] [--out benchmarks/cpu/regimes_sweep.json]

The embedded tiny model in float32 on the CPU (one thread per worker), the task "to_dict". Every run:
- the same budget: STEPS optimizer steps of BATCH examples from `tasks.batches(tok, "to_dict", BATCH,
  seed=seed)` (so the same examples and tokens for every regime at one seed), AdamW (weight decay 0,
  gradient norm clipped at 1), WARMUP steps of linear warmup then linear decay to the end, for every regime;
- the same precision: float32 weights, gradients, optimizer states and activations (no autocast on the CPU;
  on a GPU the notebook trains the same float32 weights under bf16 autocast, Trainer's bf16=True);
- the seed sets the batch order and the initial adapter (LoRA's A, the adapter's W_down, the soft prompt);
- scored by exact match of greedy decoding (`tasks.evaluate`) on the two halves of the 200-example test
  split: "dev" (test[:50]) chooses the learning rate, "test" (test[100:]) reports.

Regimes (notebook 06's recipes): full fine-tuning; freeze-tuning (last 2 blocks, final norm, head); LoRA
r=8, alpha=16 on the 7 projections; a bottleneck adapter m=32 after every MLP; PEFT prompt tuning with 16
virtual tokens (SAMPLE_VOCAB). The lr sweep: each regime's grid LRS (steps of about 3x) over SWEEP_SEEDS;
the lr with the best mean dev accuracy wins (ties: the lower mean final training loss); when the winner
sits at an end of the grid, the next lr beyond it is run too (at most EXTEND times). Then the remaining
SEEDS at the chosen lr. Rank sweep: LoRA at LoRA's chosen lr, r in RANKS, (a) fixed alpha = 16, scaling
alpha / r; (b) rsLoRA, alpha = 2 sqrt(8), scaling alpha / sqrt(r); both are scaling 2 at r = 8, the
regime sweep's LoRA, where the lr was chosen. Over RANK_SEEDS.

Runs are cached one JSON line each (--cache), so an interrupted sweep resumes, and --workers processes
share the runs. About 50 runs of STEPS steps (budgets cut to fit a shared 2-core machine under a load of ~12: 40
steps, the lr sweep on one seed, one grid extension, ranks 1, 8, 64 on 2 seeds, 50 dev examples); the meta's cpu_seconds says what each took. The JSON (qlearn.experiment.record) holds a Spread per configuration and in its meta the
command, the budgets, the lr sweep, the choices, the trainable counts, CPU seconds and the versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "cpu" / "regimes_sweep.json"
CACHE = ROOT / ".scratch" / "regimes_sweep" / "runs.jsonl"
TASK, BATCH, STEPS, SCHEDULE = "to_dict", 16, 40, "linear"
WARMUP = STEPS // 10  # steps of linear warmup
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LRS = {"lora": (2e-3, 6e-3, 2e-2), "full": (1e-4, 3e-4, 1e-3), "freeze": (3e-4, 1e-3, 3e-3),
       "adapter": (3e-3, 1e-2, 3e-2), "prompt": (0.1, 0.3, 1.0)}
SWEEP_SEEDS, SEEDS, EXTEND = (0,), (0, 1, 2), 1  # the lr sweep on one seed: cut to fit a shared 2-core CPU
RANK_SEEDS = (0, 1)
RANKS = (1, 64)  # and r = 8, the regime sweep's LoRA
SCALINGS = {"alpha/r": dict(alpha=16, use_rslora=False),
            "alpha/sqrt(r)": dict(alpha=2 * math.sqrt(8), use_rslora=True)}  # both scaling 2 at r = 8
N_TOP, BOTTLENECK, VIRTUAL = 2, 32, 16


def build(kind: str, base, r: int = 8, alpha: float = 16, use_rslora: bool = False):
    """A fresh copy of `base` set up for one regime (the notebook's recipes)."""
    from peft import PromptTuningConfig, get_peft_model

    from qlearn import adapters, lora

    model = copy.deepcopy(base)
    if kind == "full":
        return model.requires_grad_(True)
    if kind == "freeze":
        for module in [*model.model.layers[-N_TOP:], model.model.norm, model.lm_head]:
            module.requires_grad_(True)
        return model
    if kind == "lora":
        return lora.apply_lora(model, TARGETS, r=r, alpha=alpha, use_rslora=use_rslora)
    if kind == "adapter":
        return adapters.apply_adapters(model, bottleneck=BOTTLENECK)
    if kind == "prompt":
        return get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL,
                                                        prompt_tuning_init="SAMPLE_VOCAB"))
    raise ValueError(f"kind must be one of {tuple(LRS)}, got {kind!r}")


def key(kind: str, lr: float, seed: int, r: int = 8, scaling: str = "alpha/r") -> str:
    return f"{kind} lr={lr:g} seed={seed}" + (f" r={r} {scaling}" if (r, scaling) != (8, "alpha/r") else "")


def train_one(spec: dict, base, tok, task, steps: int = STEPS, n_dev: int = 50, n_test: int = 100) -> dict:
    """One run: build, train, score on dev and test (`spec`: kind, lr, seed, r, scaling)."""
    import torch

    import qlearn
    from qlearn import tasks, train
    from qlearn.modules import count_trainable

    flags = SCALINGS[spec["scaling"]] if spec["kind"] == "lora" else {}
    qlearn.seed_everything(spec["seed"])
    model = build(spec["kind"], base, r=spec["r"], **flags)
    t0 = time.process_time()
    try:
        res = train.fit(model, tasks.batches(tok, TASK, BATCH, seed=spec["seed"]), steps=steps, lr=spec["lr"],
                        warmup=steps // 10, schedule=SCHEDULE, seed=spec["seed"], progress=False)
    except FloatingPointError as err:  # a too-large lr: the run counts as failed, never chosen
        return {**spec, "diverged": str(err), "dev": 0.0, "test": 0.0, "loss": None}
    seconds = time.process_time() - t0
    with torch.no_grad():
        dev = tasks.evaluate(model, tok, TASK, examples=task.test[:n_dev])
        test = tasks.evaluate(model, tok, TASK, examples=task.test[100:100 + n_test])
    return {**spec, "dev": dev, "test": test, "loss": statistics.fmean(res[-10:]), "losses": list(res),
            "tokens": res.tokens, "trainable": count_trainable(model), "cpu_seconds": seconds}


def _next_lr(lr: float, up: bool) -> float:
    return float(f"{lr * 10 ** (0.5 if up else -0.5):.0e}")  # about 3x, one significant digit


def needed(done: dict) -> tuple[list[dict], dict]:
    """The runs still missing given the finished ones, and the lr choices made so far ({kind: lr})."""
    todo, chosen = [], {}
    spec = lambda kind, lr, seed, r=8, scaling="alpha/r": dict(kind=kind, lr=lr, seed=seed, r=r,  # noqa: E731
                                                               scaling=scaling)
    for kind, grid in LRS.items():
        grid = list(grid)
        for _ in range(EXTEND + 1):
            missing = [spec(kind, lr, s) for lr in grid for s in SWEEP_SEEDS if key(kind, lr, s) not in done]
            if missing:
                todo += missing
                break
            best = choose(kind, grid, done)
            if best not in (grid[0], grid[-1]) or len(grid) >= len(LRS[kind]) + EXTEND:
                chosen[kind] = best
                break
            grid = sorted({*grid, _next_lr(best, best == grid[-1])})
        if kind in chosen:
            todo += [spec(kind, chosen[kind], s) for s in SEEDS if key(kind, chosen[kind], s) not in done]
    if "lora" in chosen:
        todo += [spec("lora", chosen["lora"], s, r, sc) for r in RANKS for sc in SCALINGS for s in RANK_SEEDS
                 if key("lora", chosen["lora"], s, r, sc) not in done]
    return todo, chosen


def lr_grid(kind: str, done: dict) -> list[float]:
    return sorted({run["lr"] for run in done.values() if run["kind"] == kind and run["r"] == 8
                   and run["scaling"] == "alpha/r"})


def choose(kind: str, grid, done: dict) -> float:
    """The lr of `grid` with the best mean dev accuracy over SWEEP_SEEDS (ties: the lower mean loss)."""
    def score(lr):
        runs = [done[key(kind, lr, s)] for s in SWEEP_SEEDS]
        losses = [r["loss"] if r["loss"] is not None else math.inf for r in runs]
        return (statistics.fmean(r["dev"] for r in runs), -statistics.fmean(losses))
    return max(grid, key=score)


def load_cache(path: Path) -> dict:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                run = json.loads(line)
                done[key(run["kind"], run["lr"], run["seed"], run["r"], run["scaling"])] = run
    return done


def _alive(claim: Path) -> bool:
    try:
        os.kill(int(claim.read_text() or 0), 0)
        return True
    except (ValueError, ProcessLookupError, FileNotFoundError):
        return False
    except PermissionError:
        return True


def worker(index: int, cache: Path, smoke: bool) -> None:
    """Take missing runs one at a time (a claim file per run, so workers never repeat one) until none is left."""
    import torch
    import transformers

    import qlearn
    from qlearn import tasks

    torch.set_num_threads(1)  # two threads on a busy 2-core machine spin and slow every run several-fold
    transformers.logging.set_verbosity_error()
    base, tok = qlearn.load_model("tiny", device="cpu", dtype=torch.float32)
    base.requires_grad_(False)
    task = tasks.load(TASK)
    claims = cache.parent / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    while True:
        todo, _ = needed(load_cache(cache))
        for spec in todo:
            claim = claims / (key(**{k: spec[k] for k in ("kind", "lr", "seed", "r", "scaling")})
                              .replace(" ", "_").replace("/", "÷"))
            if claim.exists() and not _alive(claim):
                claim.unlink(missing_ok=True)  # left by a worker that died: its run is free again
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        else:
            if not todo:
                return
            time.sleep(20)  # the other workers hold the remaining runs; their results decide what follows
            continue
        run = train_one(spec, base, tok, task, **({"steps": 2, "n_dev": 4, "n_test": 4} if smoke else {}))
        with cache.open("a") as f:
            f.write(json.dumps(run) + "\n")
        print(f"[{index}] {key(**spec)}: dev {run['dev']:.0%} test {run['test']:.0%} loss {run['loss']} "
              f"({run.get('cpu_seconds', 0):.0f} CPU s)", flush=True)


def record(done: dict, chosen: dict, out: Path, smoke: bool) -> dict:
    import torch
    import transformers

    import qlearn
    from qlearn.env import cpu_name
    from qlearn.experiment import Spread
    from qlearn.experiment import record as write

    spreads, sweep = {}, {}
    for kind in LRS:
        sweep[kind] = {f"{lr:g}": {"dev": [done[key(kind, lr, s)]["dev"] for s in SWEEP_SEEDS],
                                   "loss": [done[key(kind, lr, s)]["loss"] for s in SWEEP_SEEDS]}
                       for lr in lr_grid(kind, done)}
        runs = [done[key(kind, chosen[kind], s)] for s in SEEDS]
        for metric in ("dev", "test"):
            spreads[f"{kind}_{metric}"] = Spread(tuple(r[metric] for r in runs), f"{kind} ({metric})", True)
        spreads[f"{kind}_loss"] = Spread(tuple(r["loss"] for r in runs), f"{kind} final training loss")
    for r in (*RANKS, 8):
        for sc in SCALINGS:
            runs = [done[key("lora", chosen["lora"], s, r, "alpha/r" if r == 8 else sc)] for s in RANK_SEEDS]
            spreads[f"rank_{sc}_r{r}_test"] = Spread(tuple(x["test"] for x in runs), f"r={r} {sc}", True)
            spreads[f"rank_{sc}_r{r}_loss"] = Spread(tuple(x["loss"] for x in runs), f"r={r} {sc} loss")
    first = {kind: done[key(kind, chosen[kind], 0)] for kind in LRS}
    tokens = {first[k]["tokens"] for k in LRS}
    assert len(tokens) == 1, f"the regimes saw different token counts at seed 0: {tokens}"
    meta = {
        "command": "python benchmarks/regimes_sweep.py" + (" --smoke" if smoke else ""),
        "model": "data/tiny, float32 weights, gradients, AdamW states and activations (CPU, no autocast)",
        "task": TASK, "dev": "test[:50] (chooses the lr)", "test": "test[100:] (reported)",
        "budget": {"steps": 2 if smoke else STEPS, "batch": BATCH, "tokens_seed0": tokens.pop(), "warmup": 0 if smoke else WARMUP,
                   "schedule": "linear warmup, then linear decay", "optimizer": "torch AdamW, weight decay 0",
                   "max_grad_norm": 1.0},
        "regimes": {"full": "every parameter", "freeze": f"last {N_TOP} blocks + final norm + lm_head",
                    "lora": f"r=8, alpha=16 on {TARGETS}", "adapter": f"bottleneck m={BOTTLENECK} after every MLP",
                    "prompt": f"PEFT prompt tuning, {VIRTUAL} virtual tokens, SAMPLE_VOCAB"},
        "trainable": {k: first[k]["trainable"] for k in LRS},
        "lr_sweep": {"grids": {k: list(v) for k, v in LRS.items()}, "seeds": list(SWEEP_SEEDS),
                     "rule": "best mean dev accuracy, ties: lower mean final loss; extended past an end",
                     "runs": sweep},
        "lr": {k: chosen[k] for k in LRS}, "seeds": list(SEEDS),
        "rank_sweep": {"ranks": list(RANKS), "lr": chosen["lora"], "seeds": list(RANK_SEEDS), "scalings": {
            "alpha/r": "alpha = 16 fixed, scaling alpha / r", "alpha/sqrt(r)": "rsLoRA, alpha = 2 sqrt(8)"}},
        "cpu_seconds": {k: statistics.fmean(done[key(k, chosen[k], s)]["cpu_seconds"] for s in SEEDS)
                        for k in LRS},
        "machine": {"processor": cpu_name(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "transformers": transformers.__version__, "qlearn": qlearn.__version__, "threads": 1},
    }
    return write(out, spreads, **meta)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="2 steps, 4 examples scored: checks the script")
    args = parser.parse_args(argv)
    if args.smoke and args.cache == CACHE:
        args.cache = CACHE.with_name("smoke.jsonl")
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    if args.workers == 1:
        worker(0, args.cache, args.smoke)
    else:
        procs = [mp.get_context("spawn").Process(target=worker, args=(i, args.cache, args.smoke))
                 for i in range(args.workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    done = load_cache(args.cache)
    todo, chosen = needed(done)
    assert not todo, f"{len(todo)} runs are still missing"
    record(done, chosen, args.out, args.smoke)
    print(f"wrote {args.out}; lr: {chosen}")


if __name__ == "__main__":
    main()
