"""Peak GPU memory and step time of fine-tuning a 1B-parameter Llama, measured against the ledger.

    python benchmarks/gpu_memory.py [--only real|variants|trainer] [--out benchmarks/gpu/memory_ledger.json]

Builds a Llama 3.2 1B-shaped model with random weights (qlearn.gpu_lab.LLAMA_1B, no download),
saves it to a temporary folder, then for each configuration loads it the way a learner would and
measures (qlearn.gpu_lab.measure) peak allocated and reserved memory, what the forward keeps, the
SDPA kernel and the median step time, beside qlearn.memory.estimate's prediction for the same
configuration. "real" rows take the learner's path (bf16 autocast around the forward, as Trainer/TRL
with bf16=True); "variants" are the same configurations without autocast (the old harness) and full
fine-tuning with fp32 weights under autocast (in "unmodeled_rows": the ledger does not model it);
"trainer" measures two real-path rows again through transformers.Trainer itself (bf16=True:
qlearn.gpu_lab.measure_trainer), the check that the harness's autocast loop is the learner's path. Each row is guarded: a failure is recorded in the JSON's
"errors" and the run goes on; the JSON is rewritten after every row. Needs a CUDA GPU (~3 min on an H200).
`--device cpu --quick` runs the logic on a tiny model on the CPU (a smoke test: no memory figures).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing qlearn

from qlearn import gpu_lab  # noqa: E402

# (method, batch, seq, grad_checkpointing, optimizer, autocast, weights dtype)
REAL = [
    ("full", 4, 512, False, "adamw", True, "bf16"),
    ("lora", 4, 512, False, "adamw", True, "bf16"),
    ("qlora", 4, 512, False, "adamw", True, "bf16"),
    ("lora", 4, 512, True, "adamw", True, "bf16"),
    ("qlora", 4, 512, True, "paged_adamw_8bit", True, "bf16"),
    ("lora", 1, 512, True, "adamw", True, "bf16"),
    ("qlora", 1, 512, True, "paged_adamw_8bit", True, "bf16"),
]
VARIANTS = [(m, b, s, gc, opt, False, w) for m, b, s, gc, opt, _, w in REAL] + [
    ("full", 4, 512, False, "adamw", True, "fp32"),
]
TRAINER = [("lora", 4, 512, False), ("qlora", 4, 512, False)]  # (method, batch, seq, grad_checkpointing)
START = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f} s] {msg}", flush=True)


def versions() -> dict:
    out = {}
    for p in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[p] = version(p)
        except Exception:  # noqa: BLE001
            out[p] = None
    return out


def one_row(model_dir, cfg, config, steps: int) -> dict:
    method, batch, seq, gc, opt, autocast, wdtype = cfg
    m = gpu_lab.measure(model_dir, method, batch_size=batch, seq_len=seq, grad_checkpointing=gc, optimizer=opt,
                        autocast=autocast, weights_dtype=wdtype, steps=steps)
    row = m.as_dict()
    try:  # the prediction is recomputed by the notebook; recorded here for reference
        ledger = gpu_lab.predicted(config, row)
        row |= {"predicted_bytes": int(ledger.total), "predicted": ledger.as_dict(),
                "error": round(ledger.total / m.peak_bytes - 1, 4)}
    except Exception as err:  # noqa: BLE001
        row |= {"predicted_bytes": None, "predicted_error": f"{type(err).__name__}: {err}"}
    return row


def wdtype_of(cfg) -> str:
    return cfg[6]


def cpu_smoke() -> None:
    """The same loading and training code on a tiny Llama on the CPU (no allocator figures there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**tiny)).to(torch.bfloat16).save_pretrained(tmp)
        for method, batch, seq, gc, opt, autocast, wdtype in REAL + VARIANTS:
            if opt != "adamw":
                continue  # bitsandbytes' paged optimizers need CUDA
            model = gpu_lab.load_for_training(tmp, method, lora_r=4, grad_checkpointing=gc, weights_dtype=wdtype,
                                              device="cpu")
            o = gpu_lab._optimizer(opt, [p for p in model.parameters() if p.requires_grad])
            _, losses = gpu_lab.train_steps(model, o, steps=2, batch_size=batch, seq_len=16, device="cpu",
                                            autocast=autocast)
            sdpa = gpu_lab.sdpa_ops(model, seq_len=16, device="cpu", autocast=autocast)
            log(f"cpu {gpu_lab.label(dict(method=method, batch_size=batch, grad_checkpointing=gc, optimizer=opt, autocast=autocast, weights_dtype=wdtype))}: "
                f"losses {[round(v, 3) for v in losses]}, sdpa {sdpa}")
        row = gpu_lab.measure_trainer(tmp, "lora", batch_size=2, seq_len=16, lora_r=4, steps=1, device="cpu")
        log(f"cpu lora b2 via Trainer: optimizer {row['optimizer']}, losses {row['losses']}")
    log("CPU smoke test passed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("all", "real", "variants", "trainer"), default="all")
    ap.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="with --device cpu: the tiny-model smoke test")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu" / "memory_ledger.json")
    args = ap.parse_args()
    if args.device == "cpu":
        return cpu_smoke()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu --quick for a smoke test)")
    import logging
    import warnings

    from transformers import LlamaConfig

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    configs = {"all": REAL + VARIANTS, "real": REAL, "variants": VARIANTS, "trainer": []}[args.only]
    config = LlamaConfig(**gpu_lab.LLAMA_1B)
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "versions": versions(),
              "python": platform.python_version(), "command": "python " + " ".join(sys.argv),
              "how": "qlearn.gpu_lab.measure: from_pretrained as a learner loads, steps+1 optimizer steps on random "
                     "tokens (the first untimed), gc.collect + empty_cache before each baseline; autocast=True: "
                     "the forward under torch.autocast('cuda', bfloat16) as Trainer/TRL with bf16=True",
              "rows": [], "unmodeled_rows": [], "errors": []}
    if args.out.exists() and args.only != "all":  # keep the other half of an earlier run
        old = json.loads(args.out.read_text())
        keep = [r for r in old.get("rows", []) if tuple(
            (r["method"], r["batch_size"], r["seq_len"], r["grad_checkpointing"], r["optimizer"],
             r.get("autocast", False), r.get("weights_dtype", "bf16"))) not in configs and "autocast" in r]
        result["rows"] = keep
        result["unmodeled_rows"] = [r for r in old.get("unmodeled_rows", []) if args.only != "variants"]
        if args.only != "trainer":
            result["trainer"] = old.get("trainer", [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["params"] = gpu_lab.build_random_llama(tmp)
        log(f"{result['device']}: built and saved the 1B-shaped Llama ({result['params']:,} parameters)")
        for cfg in configs:
            name = gpu_lab.label(dict(zip(("method", "batch_size", "seq_len", "grad_checkpointing", "optimizer",
                                           "autocast", "weights_dtype"), cfg)))
            try:
                row = one_row(tmp, cfg, config, args.steps)
            except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
                result["errors"].append({"row": name, "error": f"{type(err).__name__}: {err}",
                                         "trace": traceback.format_exc(limit=6)})
                log(f"FAILED {name}: {type(err).__name__}: {err}")
                gpu_lab._release()
                continue
            # fp32 weights under autocast are not in memory.estimate's model: kept apart from the ledger rows
            result["rows" if row.get("predicted_bytes") or wdtype_of(cfg) == "bf16" else "unmodeled_rows"].append(row)
            pred = f"{row['predicted_bytes'] / 2**30:6.2f}" if row.get("predicted_bytes") else "     -"
            log(f"{name:<30} peak {row['peak_bytes'] / 2**30:6.2f} GiB (reserved {row['peak_reserved_bytes'] / 2**30:6.2f}, "
                f"weights {row['weights_bytes'] / 2**30:5.2f}, forward keeps {row['forward_bytes'] / 2**30:5.2f}, "
                f"baseline {row['baseline_bytes'] / 2**20:.0f} MiB, left after {row['left_after_bytes'] / 2**20:.0f} MiB)  "
                f"predicted {pred} GiB  "
                f"step {row['step_seconds'] * 1e3:6.1f} ms  sdpa {row['sdpa']}")
            result["seconds"] = round(time.time() - START, 1)
            args.out.write_text(json.dumps(result, indent=1))
        if args.only in ("all", "trainer"):
            result["trainer"] = []
            for method, batch, seq, gc in TRAINER:
                name = f"{method} b{batch} via Trainer"
                try:
                    row = gpu_lab.measure_trainer(tmp, method, batch_size=batch, seq_len=seq, grad_checkpointing=gc,
                                                  steps=args.steps)
                except Exception as err:  # noqa: BLE001
                    result["errors"].append({"row": name, "error": f"{type(err).__name__}: {err}",
                                             "trace": traceback.format_exc(limit=6)})
                    log(f"FAILED {name}: {type(err).__name__}: {err}")
                    gpu_lab._release()
                    continue
                result["trainer"].append(row)
                log(f"{name:<30} peak {row['peak_bytes'] / 2**30:6.2f} GiB (reserved {row['peak_reserved_bytes'] / 2**30:6.2f}, "
                    f"weights {row['weights_bytes'] / 2**30:5.2f})  step {row['step_seconds'] * 1e3:6.1f} ms  optim {row['optimizer']}")
                args.out.write_text(json.dumps(result, indent=1))
    result["seconds"] = round(time.time() - START, 1)
    args.out.write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out}: {len(result['rows'])} rows, {len(result['errors'])} errors")


if __name__ == "__main__":
    main()
