"""NF4 quantize + dequantize: qlearn's from-scratch PyTorch against bitsandbytes' kernels.

    python benchmarks/nf4_speed.py [--device cpu|cuda] [--out benchmarks/<device>/nf4_speed.json]

For a 4096 x 4096 weight in bf16 (a 7B model's attention projection), blocks of 64: checks that
both give the same codes and the same dequantized tensor, then times each side (median of 20 runs
after 3 warm-ups; CUDA timings synchronize) and reports the ratio qlearn / bitsandbytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import bitsandbytes.functional as F
import torch

from qlearn.quant import nf4


def timed(fn, device: torch.device, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    w = (torch.randn(args.size, args.size, device=device) * 0.02).to(torch.bfloat16)

    # Same result first: a speed ratio between different answers means nothing.
    ours = nf4.quantize_nf4(w, blocksize=64)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    theirs = F.dequantize_4bit(packed, state)
    same = torch.equal(ours.dequantize(), theirs)

    rows = {
        "quantize": (timed(lambda: nf4.quantize_nf4(w, blocksize=64), device),
                     timed(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4"), device)),
        "dequantize": (timed(ours.dequantize, device),
                       timed(lambda: F.dequantize_4bit(packed, state), device)),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, {args.size}x{args.size} bf16, blocks of 64; identical dequantized tensors: {same}")
    load = os.getloadavg()[0] if device.type == "cpu" and hasattr(os, "getloadavg") else None
    result = {"date": time.strftime("%Y-%m-%d"), "device": name, "threads": torch.get_num_threads(),
              "load_average_1min": round(load, 1) if load is not None else None,  # a shared CPU: timings depend on it
              "size": args.size, "identical": same,
              "versions": {p: version(p) for p in ("torch", "bitsandbytes")}, "rows": {}}
    for op, (q, b) in rows.items():
        print(f"{op:<11} qlearn {q * 1e3:8.3f} ms   bitsandbytes {b * 1e3:8.3f} ms   ratio {q / b:6.1f}x")
        result["rows"][op] = {"qlearn_ms": round(q * 1e3, 4), "bitsandbytes_ms": round(b * 1e3, 4),
                              "ratio": round(q / b, 2)}
    out = args.out or Path("benchmarks") / device.type / "nf4_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
