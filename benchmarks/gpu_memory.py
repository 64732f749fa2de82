"""Peak GPU memory and step time of fine-tuning a 1B-parameter Llama, measured against the ledger.

    python benchmarks/gpu_memory.py [--out benchmarks/gpu/memory_ledger.json]

Builds a Llama 3.2 1B-shaped model with random weights (qlearn.gpu_lab.LLAMA_1B, no download),
saves it to a temporary folder, then for each configuration loads it the way a learner would and
measures (qlearn.gpu_lab.measure) peak allocated memory and the median step time, beside
qlearn.memory.estimate's prediction for the same configuration. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import LlamaConfig

from qlearn import gpu_lab

CONFIGS = [  # (method, batch, seq, grad_checkpointing, optimizer)
    ("full", 4, 512, False, "adamw"),
    ("lora", 4, 512, False, "adamw"),
    ("qlora", 4, 512, False, "adamw"),
    ("qlora", 4, 512, True, "paged_adamw_8bit"),
    ("lora", 1, 512, True, "adamw"),
    ("qlora", 1, 512, True, "paged_adamw_8bit"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/gpu/memory_ledger.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    cfg = LlamaConfig(**gpu_lab.LLAMA_1B)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n = gpu_lab.build_random_llama(tmp)
        torch.cuda.empty_cache()
        for method, batch, seq, gc, opt in CONFIGS:
            m = gpu_lab.measure(tmp, method, batch_size=batch, seq_len=seq, grad_checkpointing=gc, optimizer=opt)
            row = m.as_dict()
            ledger = gpu_lab.predicted(cfg, row)
            row |= {"predicted_bytes": int(ledger.total), "predicted": ledger.as_dict()}
            row["error"] = round(row["predicted_bytes"] / m.peak_bytes - 1, 4)
            rows.append(row)
            print(f"{gpu_lab.label(row):<24} peak {m.peak_bytes / 2**30:6.2f} GiB   "
                  f"predicted {ledger.total / 2**30:6.2f} GiB ({row['error']:+.1%})   "
                  f"step {m.step_seconds * 1e3:7.1f} ms", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
              "params": n, "versions": {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")},
              "python": platform.python_version(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
