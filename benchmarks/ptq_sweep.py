"""Post-training quantization of the course's language model: the methods x bits over calibration draws,
the 4-bit code books, calibration size and source, and how far each figure moves on another arithmetic
set-up (notebook 03).

    python benchmarks/ptq_sweep.py [--out benchmarks/cpu/ptq_sweep.json]

The model is data/tiny in float32 (one CPU thread per process); every nn.Linear of the transformer blocks is
quantized, lm_head and the embeddings stay in float32 (quantize_model's default). The yardstick is
`qlearn.perplexity(model, tok)` with its defaults: exp(mean next-token NLL) over the first 8192 tokens of
data/val.txt in windows of 256. The rest of data/val.txt, cut in windows of 128 tokens (329 windows), is the
calibration pool: draw d takes CALIB windows at random without replacement (torch.randperm seeded d).

Configurations (keys of the JSON's spreads):
- "fp32": the unquantized model.
- "{rtn,hqq}-{8,4,3,2}": no data, one run each (no draw spread; their spread is the machine's, below).
- "gptq-3", "awq-3": one run per draw (DRAWS), 64 windows = 8192 tokens each; "gptq-4": draws 0 and 1.
  One grid for all four: asymmetric, groups of 64 input features, an fp16 scale and an fp16 zero point per
  group (bits + 32/64 bits per parameter, from the states). GPTQ: percdamp 0.01, no act-order; AWQ: n_grid
  20 with its clipping search (quantize_model's defaults).
- "{nf4,fp4,int4,e2m1}-4": blockwise absmax in blocks of 64 with a float32 absmax (4 + 32/64 = 4.5 bits),
  code books nf4.codebook(), nf4.fp4_codebook() (bitsandbytes' FP4), k/7 for k = -7..7 (QLoRA's "Int4") and
  nf4.e2m1_codebook() (OCP FP4).
- "gptq-3-calib8": GPTQ at 3 bits with the first 8 windows of each draw's order (64 is "gptq-3").
  `run` also knows "gptq-3-calib256" and "gptq-3-random64" (64 windows of uniformly random token ids, seed d);
  the budget cut left them out of the record.
- The machine spread: the "drift" part of meta re-runs DRIFT_KEYS (draw 0 for GPTQ/AWQ) on another
  arithmetic set-up of the same CPU: ATEN_CPU_CAPABILITY=default (torch's portable kernels, 1 thread; a
  two-thread set-up fell to the budget cut: notebook 03's nbval runs, at two threads, check that one). It
  stores every value and the largest
  |difference| from the main run, separately for the methods without data and for GPTQ/AWQ. Notebook 03
  uses these as the margins of its verdicts.

Budget, cut to fit a restart day on a shared 2-core CPU (meta "budget_cut"): 3 draws (GPTQ at 4 bits: 2),
GPTQ at 4 and 3 bits and AWQ at 3 bits only, no 256-window or random-token run (notebook 03 measures 8, 64
and 256 windows on one layer). About 6 CPU-minutes on a 2-core AVX2 machine, in worker processes (PARTS, one thread each, plus the drift
set-ups) run side by side; each writes its results to a file after every configuration, and the parent
merges the files into one record (`--merge-only` merges the files of an earlier run).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import qlearn
from qlearn import experiment, modules
from qlearn.env import cpu_name
from qlearn.evaluate import token_windows
from qlearn.quant import nf4, quantize_copy, rtn

BITS = (8, 4, 3, 2)
METHODS = ("rtn", "hqq", "gptq", "awq")
CALIBRATED = ("gptq", "awq")
FORMATS = ("nf4", "fp4", "int4", "e2m1")
GROUP, SEQ, CALIB = 64, 128, 64
DRAWS = (0, 1, 2)
GPTQ4_DRAWS = (0, 1)  # GPTQ at 4 bits: two draws (the budget cut)
EVALUATED = 8192 // SEQ  # perplexity() reads the first 8192 tokens: the first 64 windows of 128
DRIFT_KEYS = ("fp32", "rtn-3", "rtn-2", "hqq-3", "hqq-2", "nf4-4", "fp4-4", "gptq-3", "awq-3")
PARTS_DIR = Path(tempfile.gettempdir()) / "qlearn_ptq_sweep_parts"  # the workers' files
OUT = Path(__file__).parent / "cpu" / "ptq_sweep.json"


def tables() -> dict[str, torch.Tensor]:
    """The four 4-bit code books, each in [-1, 1]."""
    return {"nf4": nf4.codebook(), "fp4": nf4.fp4_codebook(), "int4": torch.arange(-7, 8) / 7,
            "e2m1": nf4.e2m1_codebook()}


def setup(threads: int = 1, model_name: str = "tiny"):
    """(float32 model, tokenizer, calibration pool): the windows of 128 after the evaluated tokens, (329, 128)."""
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    model, tok = qlearn.load_model(model_name, device="cpu", dtype=torch.float32)
    windows = token_windows(tok, seq_len=SEQ, max_tokens=10**7)  # all of data/val.txt, (n, 128)
    return model, tok, windows[EVALUATED:]


def calib_draw(pool: torch.Tensor, draw: int, n: int = CALIB) -> list[torch.Tensor]:
    """The first n windows of draw d's random order of the pool (benchmarks/qat_sweep.py's draws for n = 64)."""
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(draw))
    return list(pool[order[:n]])


def random_calib(vocab_size: int, seed: int, n: int = CALIB) -> list[torch.Tensor]:
    """n windows of uniformly random token ids: calibration data unlike any text."""
    return list(torch.randint(0, vocab_size, (n, SEQ), generator=torch.Generator().manual_seed(seed)))


def blockwise_copy(model, table: torch.Tensor, blocksize: int = 64):
    """A copy of `model` whose block linear layers hold table[code] * absmax (blocks of `blocksize`);
    returns (copy, bits per parameter from the states)."""
    q = copy.deepcopy(model)
    states = {}
    for name, layer in modules.linear_layers(q).items():
        states[name] = nf4.quantize_blockwise(layer.weight.data, table, blocksize)
        layer.weight.data.copy_(states[name].dequantize())
    return q, sum(s.storage_bits() for s in states.values()) / sum(s.numel for s in states.values())


def run(model, tok, pool, key: str, draw: int = 0) -> tuple[float, float]:
    """(perplexity, bits per parameter) of configuration `key` (module docstring), calibration draw `draw`."""
    if key == "fp32":
        return qlearn.perplexity(model, tok), 32.0
    method, bits, *variant = key.split("-")
    if method in FORMATS:
        q, bpp = blockwise_copy(model, tables()[method])
        return qlearn.perplexity(q, tok), bpp
    calib = None
    if method in CALIBRATED:
        calib = {"calib8": lambda: calib_draw(pool, draw, 8), "calib256": lambda: calib_draw(pool, draw, 256),
                 "random64": lambda: random_calib(len(tok), draw)}[variant[0]]() if variant else calib_draw(pool, draw)
    q = quantize_copy(model, method, int(bits), GROUP, calib=calib)
    return qlearn.perplexity(q, tok), q.quant_report.bits_per_param


def keys() -> list[str]:
    return (["fp32"] + [f"{m}-{b}" for m in ("rtn", "hqq") for b in BITS] + ["gptq-4", "gptq-3", "awq-3"]
            + [f"{f}-4" for f in FORMATS] + ["gptq-3-calib8"])


# The workers: (name, keys, draws, threads, extra environment). Each calibrated run is a process of its own
# (about 25 CPU-seconds with the set-up): a loaded machine gives every process a small share of the CPU, so
# only side by side do they finish in time.
DEFAULT = {"ATEN_CPU_CAPABILITY": "default"}
DATA_FREE_DRIFT = [k for k in DRIFT_KEYS if k.split("-")[0] not in CALIBRATED]
PARTS = [("data-free", ["fp32", *(f"{m}-{b}" for m in ("rtn", "hqq") for b in BITS)], DRAWS, 1, {}),
         ("codebooks", [f"{f}-4" for f in FORMATS] + ["gptq-3-calib8"], DRAWS, 1, {}),
         *[(f"{k}-d{d}", [k], (d,), 1, {}) for k in ("gptq-3", "awq-3") for d in DRAWS],
         *[(f"gptq-4-d{d}", ["gptq-4"], (d,), 1, {}) for d in GPTQ4_DRAWS],
         ("drift-default", DATA_FREE_DRIFT, (0,), 1, DEFAULT),
         ("drift-default-gptq-3", ["gptq-3"], (0,), 1, DEFAULT), ("drift-default-awq-3", ["awq-3"], (0,), 1, DEFAULT)]
SETUPS = {name: ("2 threads" if "2threads" in name else "ATEN_CPU_CAPABILITY=default, 1 thread")
          for name, *_ in PARTS if name.startswith("drift")}


def sweep(model, tok, pool, wanted: list[str], draws=DRAWS, out: Path | None = None, log=print) -> dict[str, dict]:
    """{key: {"values": one perplexity per draw, "bits_per_param": ..., "cpu_seconds": per run}}, written to
    `out` after every key."""
    results = {}
    for key in wanted:
        values, t = [], time.process_time()
        for draw in (draws if key.split("-")[0] in CALIBRATED else (0,)):
            value, bpp = run(model, tok, pool, key, draw)
            values.append(value)
            log(f"  {key} draw {draw}: {value:.4f}")
        results[key] = {"values": values, "bits_per_param": bpp, "cpu_seconds": (time.process_time() - t) / len(values)}
        if out is not None:
            out.write_text(json.dumps(results, indent=1))
    return results


def start_worker(name: str, wanted: list[str], draws, threads: int, env: dict) -> subprocess.Popen:
    """A fresh process that runs `sweep` on `wanted` and writes PARTS_DIR/<name>.json, started now."""
    command = [sys.executable, __file__, "--worker", name, "--threads", str(threads)]
    return subprocess.Popen(command, env={**os.environ, **env})


def merge(out: Path) -> dict:
    """The record from the workers' files: spreads, bits per parameter, CPU seconds, drift and versions."""
    parts = {name: json.loads((PARTS_DIR / f"{name}.json").read_text()) for name, *_ in PARTS}
    main_parts = {}  # the draws of one key come from several workers, in PARTS' (draw) order
    for name, *_ in PARTS:
        for k, v in parts[name].items() if name not in SETUPS else ():
            merged = main_parts.setdefault(k, {"values": [], "bits_per_param": v["bits_per_param"], "cpu": []})
            merged["values"] += v["values"]
            merged["cpu"] += [v["cpu_seconds"]] * len(v["values"])
    for v in main_parts.values():
        v["cpu_seconds"] = sum(v["cpu"]) / len(v["cpu"])
    missing = [k for k in keys() if k not in main_parts]
    if missing:
        raise RuntimeError(f"the workers' files lack {missing}: run the sweep (again)")
    spreads = {k: experiment.Spread(tuple(main_parts[k]["values"]), k) for k in keys()}
    bpp = {k: main_parts[k]["bits_per_param"] for k in keys()}
    seconds = {k: main_parts[k]["cpu_seconds"] for k in keys()}
    main_values = {k: spreads[k].values[0] for k in DRIFT_KEYS}  # draw 0 for GPTQ/AWQ
    setups = {}
    for name, label in SETUPS.items():
        setups.setdefault(label, {}).update({k: r["values"][0] for k, r in parts[name].items()})
    diffs = {label: {k: v[k] - main_values[k] for k in v} for label, v in setups.items()}
    drift = {"keys": list(DRIFT_KEYS), "main": main_values, "setups": setups, "differences": diffs,
             "data_free": max(abs(x) for d in diffs.values() for k, x in d.items() if k.split("-")[0] not in CALIBRATED),
             "calibrated": max(abs(x) for d in diffs.values() for k, x in d.items() if k.split("-")[0] in CALIBRATED)}
    for key, value in bpp.items():  # equal bits: an fp16 scale and zero point per group of 64, a float32 absmax per block
        if key != "fp32":
            assert value == int(key.split("-")[1]) + 32 / GROUP, (key, value)
    state = rtn.quantize_rtn(torch.randn(256, 256), 4, group_size=GROUP)  # a layer's state, as quantize_model's
    meta = {
        "command": "python benchmarks/ptq_sweep.py",
        "model": "data/tiny (float32), every nn.Linear of the blocks quantized, lm_head and embeddings float32",
        "yardstick": "qlearn.perplexity(model, tok) defaults: first 8192 tokens of data/val.txt, windows of 256",
        "grid": f"integer methods: asymmetric, groups of {GROUP}, fp16 scale + fp16 zero point per group "
                "(bits + 0.5 bits/param); code books: blocks of 64, float32 absmax (4.5 bits/param)",
        "bits_per_param": bpp,
        "packed_zero_points": {"example": "rtn 4 bits, groups of 64, zero_point_bits=4",
                               "bits_per_param": dataclasses.replace(state, zero_point_bits=4).bits_per_param()},
        "budget_cut": "3 draws (gptq-4: 2), GPTQ at 4 and 3 bits and AWQ at 3 bits only, no 256-window or "
                      "random-token run, drift on DRIFT_KEYS with ATEN_CPU_CAPABILITY=default only: the restart "
                      "day's CPU budget on a shared 2-core machine (load average 40-50)",
        "calibration": {"draws": list(DRAWS), "pool": f"the windows of {SEQ} tokens after the first 8192 (329 in data/val.txt)",
                        "windows": CALIB, "tokens": CALIB * SEQ, "draw": "torch.randperm(len(pool), seed d)[:n]",
                        "gptq": "percdamp 0.01, no act-order", "awq": "n_grid 20, clipping search"},
        "drift": drift,
        "cpu_seconds": {**seconds, "note": "process time per run, one thread: quantization + one perplexity"},
        "machine": {"processor": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
                    "python": sys.version.split()[0], "torch": torch.__version__,
                    "transformers": transformers.__version__, "qlearn": qlearn.__version__, "threads": 1},
    }
    return experiment.record(out, spreads, **meta)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=[name for name, *_ in PARTS], help="run one part of the sweep")
    parser.add_argument("--merge-only", action="store_true", help="merge the workers' files of an earlier run")
    args = parser.parse_args(argv)
    if args.worker:
        _, wanted, draws, _, _ = next(p for p in PARTS if p[0] == args.worker)
        model, tok, pool = setup(args.threads)
        return sweep(model, tok, pool, wanted, draws, PARTS_DIR / f"{args.worker}.json",
                     log=lambda line: print(f"[{args.worker}] {line}", flush=True))
    if not args.merge_only:
        assert sorted({k for name, ks, *_ in PARTS if name not in SETUPS for k in ks}) == sorted(keys())
        PARTS_DIR.mkdir(parents=True, exist_ok=True)
        workers = [start_worker(*part) for part in PARTS]
        failed = [w.args for w in workers if w.wait()]
        if failed:
            raise RuntimeError(f"workers failed: {failed}")
    return merge(args.out)


if __name__ == "__main__":
    main()
