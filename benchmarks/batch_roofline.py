"""Where decoding stops being memory-bound: one linear layer's time as the batch grows, bf16 vs NF4.

    python benchmarks/batch_roofline.py [--out benchmarks/gpu/batch_roofline.json]

A linear layer y = x W^T with W of N x K and x of B rows does F = 2 B N K floating-point operations and
must move at least the weight once plus x and y: bytes = w_bytes + 2 B (K + N) (bf16 activations), with
w_bytes = 2 N K for bf16 and about 0.5 N K (+ absmax) for NF4. Its arithmetic intensity I = F / bytes is
about B FLOP/byte for bf16 and 4 B for NF4, and the time is at least max(bytes / bandwidth, F / peak):
below the ridge point I* = peak / bandwidth the layer is memory-bound (the time does not grow with B),
above it compute-bound. This script times, for B = 1 ... 4096 on an 8192 x 8192 weight:

    bf16_us           torch.matmul(x, W.t()) (cuBLAS)
    bnb_us            bitsandbytes.matmul_4bit (Linear4bit's path: a GEMV kernel at B = 1, else
                      dequantize to bf16, then cuBLAS)
    qlearn_gemv_us    qlearn.kernels.gemv_4bit (Triton, for B <= 16; W never formed)

and, in the same run, the copy bandwidth (dst.copy_(src) of 1 GiB, bytes read + written / time) and the
bf16 matmul peak (the best of a few large square GEMMs), so the ridge point is measured, not quoted.
Timing: CUDA graph replays between CUDA events, the L2 flushed (a 512 MB zero_) before each, median of
ITERS after warm-up; a call that cannot be captured is timed eagerly ("timing" says which).
Every measurement is guarded (failures land in "errors"). About 1 minute on an H200.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
SHAPE = (8192, 8192)  # (N, K): out_features, in_features
GEMV_MAX_BATCH = 16
WARMUP, ITERS = 3, 20
START = time.time()
RESULT: dict = {"errors": []}
_FLUSH = None


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f} s] {msg}", flush=True)


def guarded(what: str, fn, default=None):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one failed measurement must not lose the others
        RESULT["errors"].append({"what": what, "error": f"{type(err).__name__}: {err}",
                                 "trace": traceback.format_exc(limit=4)})
        log(f"FAILED {what}: {type(err).__name__}: {err}")
        return default


def gpu_us(fn, iters: int = ITERS) -> tuple[float, str]:
    """Median microseconds of fn() on the GPU (see the module doc) and how it was timed."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    run, how = fn, "eager"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, how = graph.replay, "cuda graph"
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly
        torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        _FLUSH.zero_()
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)), how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu" / "batch_roofline.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the CPU course shows the recorded JSON)")
    import logging

    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    vers = {p: guarded(f"version {p}", lambda p=p: version(p)) for p in ("torch", "triton", "bitsandbytes")}
    RESULT.update({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "versions": vers,
                   "shape": list(SHAPE), "timing": f"CUDA graph replay between CUDA events, median of {ITERS} after "
                   f"{WARMUP} warm-up calls, L2 flushed before each (a 512 MB zero_)"})
    log(f"{RESULT['device']} {vers}")

    # Step 1: the roofline's two roofs, measured
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = guarded("copy bandwidth", lambda: gpu_us(lambda: dst.copy_(src))[0])
    RESULT["copy_bandwidth_GBps"] = round(2 * src.numel() / us / 1e3, 1) if us else None
    del src, dst
    peaks = []
    for n in (4096, 8192, 16384):
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        us = guarded(f"gemm {n}", lambda: gpu_us(lambda: torch.matmul(a, b), iters=10)[0])
        if us:
            peaks.append({"n": n, "us": round(us, 1), "TFLOPS": round(2 * n**3 / us / 1e6, 1)})
        del a, b
    RESULT["gemm"] = peaks
    RESULT["peak_bf16_TFLOPS"] = max((p["TFLOPS"] for p in peaks), default=None)
    if RESULT["copy_bandwidth_GBps"] and RESULT["peak_bf16_TFLOPS"]:
        RESULT["ridge_flop_per_byte"] = round(RESULT["peak_bf16_TFLOPS"] * 1e12 / (RESULT["copy_bandwidth_GBps"] * 1e9), 1)
    log(f"copy {RESULT['copy_bandwidth_GBps']} GB/s, bf16 peak {RESULT['peak_bf16_TFLOPS']} TFLOPS, "
        f"ridge {RESULT.get('ridge_flop_per_byte')} FLOP/byte")

    # Step 2: one 8192 x 8192 layer, batch 1 ... 4096
    n_out, k_in = SHAPE
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(SHAPE, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    nf4_bytes = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size() \
        + state.state2.absmax.numel() * 4
    RESULT["weight_bytes"] = {"bf16": w.numel() * 2, "nf4": nf4_bytes}
    try:
        from qlearn import kernels
    except Exception:  # noqa: BLE001
        kernels = None
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, k_in, generator=g, device="cuda").to(torch.bfloat16)
        act = 2 * batch * (k_in + n_out)
        row = {"batch": batch, "flops": 2 * batch * n_out * k_in, "bf16_bytes": w.numel() * 2 + act,
               "nf4_bytes": nf4_bytes + act}
        with torch.no_grad():
            row["bf16_us"] = guarded(f"bf16 b{batch}", lambda: round(gpu_us(lambda: torch.matmul(x, w.t()))[0], 2))
            row["bnb_us"] = guarded(f"bnb b{batch}", lambda: round(gpu_us(
                lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))[0], 2))
            if kernels is not None and batch <= GEMV_MAX_BATCH:
                row["qlearn_gemv_us"] = guarded(f"qlearn gemv b{batch}", lambda: round(gpu_us(
                    lambda: kernels.gemv_4bit(x, packed, state))[0], 2))
        for who, nbytes in (("bf16", row["bf16_bytes"]), ("bnb", row["nf4_bytes"]), ("qlearn_gemv", row["nf4_bytes"])):
            us = row.get(f"{who}_us")
            if us:
                row[f"{who}_TFLOPS"] = round(row["flops"] / us / 1e6, 2)
                row[f"{who}_GBps"] = round(nbytes / us / 1e3, 1)
        rows.append(row)
        log(f"b{batch}: bf16 {row['bf16_us']} us, bnb {row['bnb_us']} us, qlearn {row.get('qlearn_gemv_us')} us")
        RESULT["rows"] = rows
        RESULT["seconds"] = round(time.time() - START, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(RESULT, indent=1))
    log(f"wrote {args.out} ({len(RESULT['errors'])} errors)")


if __name__ == "__main__":
    main()
