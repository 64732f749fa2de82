"""FP8 scaled matmuls on a GPU: torch._scaled_mm (tensorwise, rowwise) and torch's blockwise 1x128/128x128
scaled_mm against a bf16 matmul, speed and error, with qlearn's CPU emulation as the check of the result.

    python benchmarks/fp8_scaled_mm.py [--device cuda|cpu] [--sizes 4096 8192] [--out benchmarks/gpu/fp8_scaled_mm.json]

Needs CUDA compute capability >= 8.9 (Ada, Hopper) for FP8; without a CUDA device it prints why and stops
(`--device cpu --sizes 256` runs the same code on torch's CPU _scaled_mm, as a smoke test). For each size n
(a multiple of 512, so that cuBLAS's blockwise scales need no padding)
(M = K = N = n, activations x ~ N(0, 1), weights w ~ N(0, 0.02^2), y = x w^T as nn.Linear):
  - times (median of 20 after 3 warm-ups, synchronized): bf16 torch.mm; FP8 E4M3 tensorwise with and without
    use_fast_accum (Hopper's faster, less precise accumulation); rowwise (bf16 output, as torchao asks);
    blockwise (DeepSeek-V3's 1x128 activations, 128x128 weights, via torch.nn.functional.scaled_mm);
  - the error of each against a float32 matmul, ||y - y32|| / ||y32||, also with three input channels x50;
  - on the smallest size, the difference from qlearn.formats.fp8.scaled_mm (exact sums) on the same codes.
Every failure (an unsupported recipe on this torch or GPU) is recorded in the JSON under "errors"; the
script never stops on one. It takes well under 2 minutes on an H100/H200.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from qlearn.formats import fp8

RECIPES = ("tensorwise", "tensorwise_fast_accum", "rowwise", "blockwise")


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


def _scaling_type():
    import torch.nn.functional as F

    return getattr(F, "ScalingType", getattr(torch._C, "_ScalingType", None))


def prepare(recipe: str, x: torch.Tensor, w: torch.Tensor):
    """(qlearn FP8 states of x and w, a function running the torch kernel on their codes)."""
    base = "tensorwise" if recipe.startswith("tensorwise") else recipe
    block_a, block_b, pow2 = fp8.RECIPES[base]
    a = fp8.quantize_fp8(x, "fp8_e4m3", block_a, power_of_2=pow2)
    b = fp8.quantize_fp8(w, "fp8_e4m3", block_b, power_of_2=pow2)
    qa = a.codes.view(torch.float8_e4m3fn)
    qb = b.codes.view(torch.float8_e4m3fn).t()  # (K, N), column-major
    if base == "tensorwise":
        sa, sb = (1.0 / a.scale).reshape(()), (1.0 / b.scale).reshape(())
        fast = recipe.endswith("fast_accum")
        return a, b, lambda: torch._scaled_mm(qa, qb, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                              use_fast_accum=fast)
    if base == "rowwise":
        sa, sb = (1.0 / a.scale).contiguous(), (1.0 / b.scale).reshape(1, -1).contiguous()  # (M, 1), (1, N)
        return a, b, lambda: torch._scaled_mm(qa, qb, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    import torch.nn.functional as F

    st = _scaling_type()
    if st is None or not hasattr(F, "scaled_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.functional.scaled_mm / ScalingType")
    sa = (1.0 / a.scale).t().contiguous().t()  # (M, K/128), column-major (cuBLAS's layout)
    sb = (1.0 / b.scale).t()                   # (K/128, N/128), K-major (K a multiple of 512: no padding)
    return a, b, lambda: F.scaled_mm(qa, qb, scale_a=sa, scale_recipe_a=st.BlockWise1x128, scale_b=sb,
                                     scale_recipe_b=st.BlockWise128x128, output_dtype=torch.bfloat16)


def error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return round(fp8.relative_error(y.float(), ref), 6)


def run(args, result: dict) -> None:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference in full float32
    g = torch.Generator(device=device).manual_seed(0)
    for n in args.sizes:
        row = {"M=K=N": n, "ms": {}, "tflops": {}, "error_vs_fp32": {}, "error_vs_fp32_outliers": {}}
        result["rows"].append(row)
        x = torch.randn(n, n, generator=g, device=device)
        w = torch.randn(n, n, generator=g, device=device) * 0.02
        xo = x.clone()
        xo[:, [3, n // 3, n // 2]] *= 50  # three outlier channels
        flop = 2 * n**3
        y32, y32o = x @ w.T, xo @ w.T
        xb, wb = x.bfloat16(), w.bfloat16()
        row["ms"]["bf16"] = round(timed(lambda xb=xb, wb=wb: xb @ wb.T, device) * 1e3, 4)
        row["error_vs_fp32"]["bf16"] = error(xb @ wb.T, y32)
        row["error_vs_fp32_outliers"]["bf16"] = error(xo.bfloat16() @ wb.T, y32o)
        for recipe in RECIPES:
            try:
                a, b, kernel = prepare(recipe, x, w)
                y = kernel()
                row["error_vs_fp32"][recipe] = error(y, y32)
                row["ms"][recipe] = round(timed(kernel, device) * 1e3, 4)
                _, _, kernel_o = prepare(recipe, xo, w)
                row["error_vs_fp32_outliers"][recipe] = error(kernel_o(), y32o)
                if n == min(args.sizes):  # the kernel against qlearn's exact emulation on the same codes
                    ours = fp8.scaled_mm(a, b, torch.bfloat16)
                    row.setdefault("vs_qlearn_emulation", {})[recipe] = {
                        "relative_difference": error(y, ours.float()),
                        "identical_bf16": bool(torch.equal(y, ours))}
            except Exception as e:  # noqa: BLE001 - recorded, never fatal: the record says what failed
                result["errors"].append({"size": n, "recipe": recipe, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"n={n} {recipe}: {type(e).__name__}: {str(e)[:200]}")
        for name, ms in row["ms"].items():
            row["tflops"][name] = round(flop / (ms * 1e-3) / 1e12, 3)
        print(f"n={n}: ms {row['ms']}\n        error {row['error_vs_fp32']}\n"
              f"        with outliers {row['error_vs_fp32_outliers']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu (a smoke test)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.device is None:
        if not torch.cuda.is_available():
            print("skipped: FP8 matmuls need a CUDA GPU of compute capability >= 8.9; none here "
                  "(run with --device cpu --sizes 256 for a smoke test of the code on torch's CPU _scaled_mm)")
            return
        args.device = "cuda"
    device = torch.device(args.device)
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if cap else "CPU",
              "capability": list(cap) if cap else None, "torch": torch.__version__,
              "cuda": torch.version.cuda, "sizes": args.sizes, "rows": [], "errors": []}
    if cap is not None and cap < (8, 9):
        result["errors"].append({"error": f"compute capability {cap} < (8, 9): no FP8 matmul on this GPU"})
    t0 = time.perf_counter()
    try:
        run(args, result)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: keep what was measured
        result["errors"].append({"error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-2000:]})
        print(f"stopped: {type(e).__name__}: {e}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = args.out or Path(__file__).resolve().parent / device.type / "fp8_scaled_mm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['seconds']} s, {len(result['errors'])} errors)")


if __name__ == "__main__":
    main()
