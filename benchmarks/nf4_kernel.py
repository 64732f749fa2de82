"""qlearn's Triton NF4 kernels beside bitsandbytes' and bf16, on one GPU, in one run.

    python benchmarks/nf4_kernel.py [--quick] [--out benchmarks/gpu/nf4_kernel.json]

Timing: every timed call is captured once in a CUDA graph and replayed (pure GPU time, no Python
launch cost), between two CUDA events, after zeroing a 512 MB buffer that evicts the whole L2 (the
packed weights, 33-36 MB, would otherwise be read from the 60 MB L2); the median of ITERS replays
after WARMUP calls. A call that cannot be captured is timed eagerly, and its "timing" says so.
The copy bandwidth (the roofline) is measured the same way in the same run: bytes read + written
by `dst.copy_(src)` of 1 GiB. Weights: N(0, 0.02) in bf16, NF4, blocks of 64 (bitsandbytes'
quantize_4bit); `rows` store the absmax in float32, `double_quant_rows` double-quantized (QLoRA).

JSON: rows (op "dequantize" | "gemv", shape = (out_features, in_features), qlearn_us,
bitsandbytes_us, identical, bytes, floor_us = bytes / copy bandwidth, fraction of copy bandwidth;
gemv also bf16_us = torch.matmul of the bf16 weight, and bitsandbytes' F.gemv_4bit), tiles (the
tile-size effect, not tuned: the library's defaults are what `rows` use), decode (tokens/s of a
1B-shaped Llama with random weights, bf16 vs bitsandbytes NF4 vs qlearn's kernels, each step under
a CUDA graph, and eagerly for contrast), targets (issue 20), errors (each measurement is guarded:
a failure is recorded and the run goes on). The JSON is rewritten after each section; no new tile
measurement starts after TIME_LIMIT_S, so the run stays under 4 minutes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing qlearn

DEVICE = "cuda"  # (a CPU smoke run of this script's logic, under Triton's interpreter, sets "cpu")
WARMUP, ITERS = 5, 50
TIME_LIMIT_S = 200  # the tile tables stop here, the optional torch.compile row at 150 s (the run must stay < 4 min)
DEQUANT_SHAPES = [(4096, 4096), (8192, 8192)]
GEMV_SHAPES = [(8192, 8192), (4096, 14336), (14336, 4096)]
# (tile bytes, num_warps): 4 bytes per thread when tile = 128 num_warps, else more per thread
DEQUANT_TILES = [(512, 4), (1024, 8), (2048, 16), (256, 2), (1024, 4), (2048, 8), (2048, 4), (4096, 8)]
# (block_k, num_warps, rows per program, unroll): 8 columns per thread when block_k = 256 num_warps
GEMV_TILES = [(1024, 4, 1, 1), (1024, 4, 1, 2), (1024, 4, 1, 4), (512, 2, 1, 4), (2048, 8, 1, 4), (256, 1, 1, 4),
              (1024, 4, 2, 4), (2048, 4, 1, 4), (4096, 16, 1, 2)]
START = time.time()
RESULT: dict = {"errors": []}


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f} s] {msg}", flush=True)


def guarded(what: str, fn, default=None):
    """Run one measurement; on failure record the error in the JSON and carry on."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one failed measurement must not lose the others
        RESULT["errors"].append({"what": what, "error": f"{type(err).__name__}: {err}",
                                 "trace": traceback.format_exc(limit=4)})
        log(f"FAILED {what}: {type(err).__name__}: {err}")
        return default


_FLUSH = None


def gpu_us(fn, *, iters: int = ITERS, warmup: int = WARMUP) -> tuple[float, str]:
    """Median GPU microseconds of fn() (see the module docstring) and how it was timed."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(512 * 2**20, dtype=torch.uint8, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and Triton's compilation) off the capture
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    run, how = fn, "eager"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, how = graph.replay, "cuda_graph"
    except Exception as err:  # noqa: BLE001
        how = f"eager (graph capture failed: {type(err).__name__}: {err})"[:300]
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


def copy_bandwidth_GBps() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    us, _ = gpu_us(lambda: dst.copy_(src), iters=20)
    return 2 * src.numel() / us / 1e3  # bytes read + written / time


def quantized(shape, nested: bool, seed: int = 0):
    import bitsandbytes.functional as F

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = (torch.randn(shape, generator=g, device=DEVICE) * 0.02).to(torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    return w, packed, state


def state_bytes(packed, state) -> int:
    """Bytes a kernel reads for the weight: packed codes, absmax (and the nested absmax and tables)."""
    n = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        n += state.state2.absmax.numel() * 4 + 256 * 4 + 4
    return n + 16 * 4


def row_stats(row: dict, nbytes: int, bandwidth: float) -> dict:
    floor = nbytes / bandwidth / 1e3 if bandwidth else None
    row |= {"bytes": nbytes, "floor_us": round(floor, 2) if floor else None}
    for who in ("qlearn", "bitsandbytes"):
        us = row.get(f"{who}_us")
        if us and floor:
            row[f"{who}_fraction_of_copy_bw"] = round(floor / us, 3)
    return row


def dequantize_row(shape, nested: bool, bandwidth: float) -> dict:
    import bitsandbytes.functional as F

    from qlearn import kernels

    _, packed, state = quantized(shape, nested)
    ours, theirs = kernels.dequantize_4bit(packed, state), F.dequantize_4bit(packed, state)
    identical = bool(torch.equal(ours.view(torch.int16), theirs.view(torch.int16)))
    q_us, q_how = gpu_us(lambda: kernels.dequantize_4bit(packed, state))
    b_us, b_how = gpu_us(lambda: F.dequantize_4bit(packed, state))
    row = {"op": "dequantize", "shape": list(shape), "double_quant": nested, "qlearn_us": round(q_us, 2),
           "bitsandbytes_us": round(b_us, 2), "identical": identical, "timing": {"qlearn": q_how, "bitsandbytes": b_how}}
    row = row_stats(row, state_bytes(packed, state) + ours.numel() * 2, bandwidth)
    log(f"dequantize {shape} dq={nested}: qlearn {q_us:.1f} us, bitsandbytes {b_us:.1f} us, "
        f"identical {identical}, {row.get('qlearn_fraction_of_copy_bw')} of copy bandwidth")
    return row


def gemv_row(shape, nested: bool, bandwidth: float) -> dict:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from qlearn import kernels

    w, packed, state = quantized(shape, nested)
    n_out, k_in = shape
    x = torch.randn(1, k_in, device=DEVICE).to(torch.bfloat16)
    with torch.no_grad():
        y = kernels.gemv_4bit(x, packed, state)
        w_hat = F.dequantize_4bit(packed, state)                        # bf16, bitsandbytes' bits
        y_ref = torch.nn.functional.linear(x, w_hat)                    # dequantize, then matmul
        w32 = kernels.dequantize_4bit(packed, state, dtype=torch.float32)
        ratio = float(((y.double() - y_ref.double()).abs() / kernels.tolerance(w32, x, y, y_ref)).max())
        y_bnb = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        ratio_bnb = float(((y_bnb.double() - y_ref.double()).abs() / kernels.tolerance(w32, x, y_bnb, y_ref)).max())
        del w32
        q_us, q_how = gpu_us(lambda: kernels.gemv_4bit(x, packed, state))
        b_us, b_how = gpu_us(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))  # Linear4bit's batch-1 path
        g_us, _ = guarded(f"F.gemv_4bit {shape}", lambda: gpu_us(lambda: F.gemv_4bit(x, packed.t(), state=state)),
                          (None, None))
        f_us, _ = gpu_us(lambda: torch.matmul(x, w.t()))
    row = {"op": "gemv", "shape": list(shape), "double_quant": nested, "batch": 1, "qlearn_us": round(q_us, 2),
           "bitsandbytes_us": round(b_us, 2), "bitsandbytes_gemv_4bit_us": round(g_us, 2) if g_us else None,
           "bf16_us": round(f_us, 2), "identical": ratio <= 1.0, "max_error_over_bound": round(ratio, 4),
           "bitsandbytes_max_error_over_bound": round(ratio_bnb, 4), "speedup_vs_bf16": round(f_us / q_us, 2),
           "timing": {"qlearn": q_how, "bitsandbytes": b_how}}
    row = row_stats(row, state_bytes(packed, state) + 2 * (k_in + n_out), bandwidth)
    row["bf16_bytes"] = 2 * (n_out * k_in + k_in + n_out)
    if bandwidth:
        row["bf16_fraction_of_copy_bw"] = round(row["bf16_bytes"] / bandwidth / 1e3 / f_us, 3)
    log(f"gemv {shape} dq={nested}: qlearn {q_us:.1f} us, bitsandbytes {b_us:.1f} us, bf16 {f_us:.1f} us "
        f"({f_us / q_us:.2f}x), error/bound {ratio:.3f}")
    return row


def tile_table(op: str, shape, configs, bandwidth: float) -> list[dict]:
    from qlearn import kernels

    _, packed, state = quantized(shape, nested=False)
    x = torch.randn(1, shape[1], device=DEVICE).to(torch.bfloat16)
    nbytes = state_bytes(packed, state) + (2 * packed.numel() * 2 if op == "dequantize" else 2 * sum(shape))
    table = []
    for cfg in configs:
        if time.time() - START > TIME_LIMIT_S:
            RESULT["errors"].append({"what": f"tile {op} {shape} {cfg}", "error": "skipped: time limit"})
            continue
        if op == "dequantize":
            name = {"tile_bytes": cfg[0], "num_warps": cfg[1]}
            fn = functools.partial(kernels.dequantize_4bit, packed, state, tile=cfg[0], num_warps=cfg[1])
        else:
            name = {"block_k": cfg[0], "num_warps": cfg[1], "rows": cfg[2], "unroll": cfg[3]}
            fn = functools.partial(kernels.gemv_4bit, x, packed, state, block_k=cfg[0], num_warps=cfg[1],
                                   rows=cfg[2], unroll=cfg[3])
        got = guarded(f"tile {op} {shape} {name}", functools.partial(gpu_us, fn))
        if got:
            us = got[0]
            table.append(name | {"us": round(us, 2), "fraction_of_copy_bw": round(nbytes / bandwidth / 1e3 / us, 3)})
    best = min(table, key=lambda r: r["us"]) if table else None
    log(f"tiles {op} {shape}: best {best}")
    return table


# --- decode ------------------------------------------------------------------------------------------------

def weight_bytes(model) -> int:
    """Bytes of the parameters (a Linear4bit's packed weight counts its bytes) plus 4-bit scales."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * 4
    return total


def decode_tokens_per_s(model, *, graph: bool, steps: int, prompt_len: int = 16, max_len: int = 256) -> float:
    """Greedy batch-1 decoding with a static KV cache: tokens/s over `steps` steps after warm-up.

    graph=True captures one decode step (forward, argmax, position + 1, attention mask over the
    filled cache) in a CUDA graph and replays it, so no step pays Python or launch costs."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=DEVICE, generator=g)
    keys = torch.arange(max_len, device=DEVICE)
    ids = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    pos = torch.full((1,), prompt_len, dtype=torch.long, device=DEVICE)

    def step():
        mask = (keys <= pos).view(1, 1, 1, max_len)  # attend to the filled positions only
        logits = model(input_ids=ids, position_ids=pos.view(1, 1), attention_mask=mask, past_key_values=cache,
                       use_cache=True).logits
        ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        pos.add_(1)

    with torch.no_grad():
        out = model(input_ids=prompt, position_ids=torch.arange(prompt_len, device=DEVICE)[None],
                    past_key_values=cache, use_cache=True)
        ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        run = step
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            run = g.replay
            for _ in range(3):
                run()
        assert prompt_len + 3 + 3 + steps + 1 <= max_len
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            run()
        end.record()
        torch.cuda.synchronize()
    return steps / (start.elapsed_time(end) / 1e3)


def decode_rows(steps: int) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlearn import kernels
    from qlearn.gpu_lab import LLAMA_1B

    torch.manual_seed(0)
    with torch.device(DEVICE):
        bf16 = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16).eval()
    log("decode: built the 1B-shaped Llama (bf16, random weights)")
    rows = []

    def measure(name: str, model):
        row = {"model": name, "weight_bytes": weight_bytes(model)}
        for graph, key in ((True, "tokens_per_s"), (False, "eager_tokens_per_s")):
            tps = guarded(f"decode {name} graph={graph}", functools.partial(
                decode_tokens_per_s, model, graph=graph, steps=steps if graph else max(steps // 5, 10)))
            row[key] = round(tps, 1) if tps else None
        if row["tokens_per_s"]:
            row["weight_GBps"] = round(row["weight_bytes"] * row["tokens_per_s"] / 1e9, 1)
        log(f"decode {name}: {row}")
        rows.append(row)

    measure("bf16", bf16)
    four_bit = kernels.to_linear4bit(copy.deepcopy(bf16), compute_dtype=torch.bfloat16)  # QLoRA's: double quant
    del bf16
    torch.cuda.empty_cache()
    measure("bitsandbytes NF4", four_bit)
    measure("qlearn NF4 kernels", kernels.use_nf4_kernels(four_bit))  # the same weights, in place
    return rows


def readable_dequantize_row(shape) -> dict:
    """The readable PyTorch formula on the same bytes, eager and under torch.compile (the lesson's middle step)."""
    _, packed, state = quantized(shape, nested=False)
    code, absmax = state.code, state.absmax

    def readable(packed):
        codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)  # (n,): high nibble first
        w = code[codes.long()].view(-1, 64) * absmax.view(-1, 1)              # (n / 64, 64), float32
        return w.reshape(shape).to(torch.bfloat16)

    compiled = torch.compile(readable)
    same = bool(torch.equal(compiled(packed), readable(packed)))
    return {"shape": list(shape), "eager_us": round(gpu_us(lambda: readable(packed))[0], 2),
            "compiled_us": round(gpu_us(lambda: compiled(packed))[0], 2), "compiled_equals_eager": same}


def save(out: Path) -> None:
    RESULT["seconds"] = round(time.time() - START, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULT, indent=1))


def targets(rows: list[dict], bandwidth: float) -> dict:
    def find(op, shape):
        return next((r for r in rows if r["op"] == op and r["shape"] == list(shape)), None)

    t = {}
    for shape in DEQUANT_SHAPES:
        r = find("dequantize", shape)
        if r:
            t[f"dequantize {shape[0]}x{shape[1]} at or below bitsandbytes"] = r["qlearn_us"] <= r["bitsandbytes_us"]
    r = find("dequantize", (8192, 8192))
    if r and bandwidth:
        t["dequantize 8192x8192 at >= 60% of copy bandwidth"] = r.get("qlearn_fraction_of_copy_bw", 0) >= 0.6
    for shape in GEMV_SHAPES[:2]:
        r = find("gemv", shape)
        if r:
            t[f"gemv {shape[0]}x{shape[1]} >= 2.5x faster than bf16"] = r["speedup_vs_bf16"] >= 2.5
    return t


def main() -> None:
    global DEQUANT_SHAPES, GEMV_SHAPES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape of each op, short tile tables and decode")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out = args.out or ROOT / "benchmarks" / "gpu" / ("nf4_kernel_quick.json" if args.quick else "nf4_kernel.json")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/nf4_kernel.py needs a CUDA GPU (the CPU course shows the recorded JSON)")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from qlearn import kernels
    from qlearn.kernels import gemv, nf4

    if args.quick:
        DEQUANT_SHAPES, GEMV_SHAPES = [(8192, 8192)], [(8192, 8192)]
    versions = {}
    for p in ("torch", "triton", "bitsandbytes", "transformers"):
        versions[p] = guarded(f"version {p}", lambda p=p: version(p))
    versions["cuda"] = torch.version.cuda
    RESULT.update({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "versions": versions,
                   "quick": args.quick, "timing": f"CUDA graph replay between CUDA events, median of {ITERS} after "
                   f"{WARMUP} warm-up calls, L2 flushed before each (a 512 MB zero_)",
                   "weights": "N(0, 0.02) bf16 -> NF4, blocksize 64 (bitsandbytes quantize_4bit)",
                   "defaults": {"tile_bytes": nf4.TILE, "dequantize_num_warps": nf4.TILE // 128,
                                "block_k": gemv.BLOCK_K, "gemv_num_warps": gemv.BLOCK_K // 256, "rows": gemv.ROWS,
                                "unroll": gemv.UNROLL, "NF4Linear_gemv_rows": kernels.GEMV_ROWS}})
    log(f"{RESULT['device']}, {versions}")
    bandwidth = guarded("copy bandwidth", copy_bandwidth_GBps, 0.0)
    RESULT["copy_bandwidth_GBps"] = round(bandwidth, 1)
    log(f"copy bandwidth {bandwidth:.0f} GB/s")

    RESULT["rows"], RESULT["double_quant_rows"] = [], []
    for nested, key in ((False, "rows"), (True, "double_quant_rows")):
        for shape in DEQUANT_SHAPES:
            r = guarded(f"dequantize {shape} nested={nested}", functools.partial(dequantize_row, shape, nested, bandwidth))
            if r:
                RESULT[key].append(r)
        for shape in GEMV_SHAPES:
            r = guarded(f"gemv {shape} nested={nested}", functools.partial(gemv_row, shape, nested, bandwidth))
            if r:
                RESULT[key].append(r)
        save(out)
    RESULT["targets"] = targets(RESULT["rows"], bandwidth)
    log(f"targets: {RESULT['targets']}")
    save(out)

    RESULT["decode"] = {"how": "greedy batch-1 decoding, static KV cache of 256, prompt 16; tokens_per_s: each step "
                        "(forward + argmax + next position) replayed from one CUDA graph; eager_tokens_per_s: the "
                        "same step launched from Python (launch-bound)",
                        "rows": guarded("decode", lambda: decode_rows(steps=20 if args.quick else 100), [])}
    save(out)
    RESULT["tiles"] = {}
    deq_tiles = DEQUANT_TILES[:3] if args.quick else DEQUANT_TILES
    gemv_tiles = GEMV_TILES[1:4] if args.quick else GEMV_TILES
    big = DEQUANT_SHAPES[-1]
    RESULT["tiles"][f"dequantize {big[0]}x{big[1]}"] = tile_table("dequantize", big, deq_tiles, bandwidth)
    for shape in GEMV_SHAPES:
        RESULT["tiles"][f"gemv {shape[0]}x{shape[1]}"] = tile_table("gemv", shape, gemv_tiles, bandwidth)
    save(out)

    if time.time() - START < 150:  # optional: the readable formula, eager and compiled (compilation takes a while)
        RESULT["readable_pytorch_dequantize"] = [
            r for r in (guarded(f"readable {s}", lambda s=s: readable_dequantize_row(s)) for s in DEQUANT_SHAPES) if r]
    save(out)
    log(f"wrote {out} ({len(RESULT['errors'])} errors)")


if __name__ == "__main__":
    main()
