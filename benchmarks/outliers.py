"""Outlier features on the embedded model and its emulated variants (issue 17): every figure the
notebook needs, with its spread over calibration draws or seeds, and how long each step takes.

    python benchmarks/outliers.py                      # all sections, about 20-40 min on 2 busy cores
    python benchmarks/outliers.py --only w8a8 llm_int8 # some sections
    ATEN_CPU_CAPABILITY=default python benchmarks/outliers.py --only w8a8 --out /tmp/x.json   # another arithmetic

Protocol: perplexity = qlearn.perplexity (the first 8,192 tokens of data/val.txt, windows of 256),
unless --tokens says otherwise. Calibration draws: 8 windows of 256 tokens (32 for GPTQ and AWQ's
search, which overfit 2,048 tokens on this model: 3-bit GPTQ per row then loses to RTN) picked at random
(seed = draw) among the windows of val.txt after the scored ones, so calibration never sees the scored text.
Models: "original" (data/tiny), "variant" (qlearn.outliers.emulate_outliers defaults: 3 residual
channels x20, 3 o_proj-input channels x20, 8 down_proj-input channels x20 per layer), and "sparse"
(the same, with the 8 down_proj channels chosen token-sparse on draw 0's calibration windows, x100:
outliers on a few tokens). Writes a record (qlearn.experiment.record) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

import qlearn
from qlearn import experiment, outliers
from qlearn.evaluate import token_windows, validation_text
from qlearn.experiment import Spread
from qlearn.quant import activations, llm_int8, rotation, rtn, smoothquant
from qlearn.quant.model import quantize_model

SECTIONS = ("natural", "w8a8", "llm_int8", "factor", "smoothquant", "rotation", "awq", "gptq")
DRAWS = (0, 1, 2)


class Bench:
    def __init__(self, tokens: int):
        self.model, self.tok = qlearn.load_model("tiny", device="cpu")
        self.tokens = tokens
        self.windows = token_windows(self.tok, validation_text(), seq_len=256, max_tokens=60_000)
        self.first_calib = tokens // 256  # windows before this one are scored
        self.spreads: dict[str, Spread] = {}
        self.seconds: dict[str, float] = {}
        self.lines: list[str] = []
        self.variants = {"original": self.model, "variant": outliers.emulate_outliers(self.model)}
        self.variants["sparse"] = outliers.emulate_outliers(self.model, calib=self.calib(0), mlp_factor=100.0)

    def calib(self, draw: int, n: int = 8) -> torch.Tensor:
        g = torch.Generator().manual_seed(draw)
        pool = torch.arange(self.first_calib, len(self.windows))
        return self.windows[pool[torch.randperm(len(pool), generator=g)[:n]]]  # (n, 256)

    def ppl(self, model) -> float:
        return qlearn.perplexity(model, self.tok, max_tokens=self.tokens)

    def timed(self, key: str, fn, *args, **kwargs):
        """Run fn(*args, **kwargs), remember its CPU seconds (process time: all threads) under key,
        return its result."""
        c = time.process_time()
        out = fn(*args, **kwargs)
        self.seconds[key] = round(time.process_time() - c, 2)
        return out

    def add(self, key: str, values, note: str = "") -> Spread:
        s = Spread(tuple(values), key)
        self.spreads[key] = s
        fp = self.spreads.get("fp32/original")
        rel = f"  x{s.mean / fp.mean:.3f} fp32" if fp else ""
        self.lines.append(f"{key:<52} {s.format(2):<34}{rel}  {note}")
        print(self.lines[-1], flush=True)
        return s


def w_hat(out):
    """rtn/gptq return a tensor now and a QuantState soon: accept both."""
    return out.dequantize() if hasattr(out, "dequantize") else out


def section_natural(b: Bench):
    calib = b.calib(0)
    b.add("fp32/original", [b.timed("ppl fp32 (one evaluation)", b.ppl, b.model)])
    for name in ("variant", "sparse"):
        b.add(f"fp32/{name}", [b.ppl(b.variants[name])], "the same function")
    with torch.no_grad():
        x = b.windows[:2]
        for name in ("variant", "sparse"):
            diff = (b.variants[name](x).logits - b.model(x).logits).abs().max().item()
            b.lines.append(f"max |logits({name}) - logits(original)| = {diff:.2e}")
            print(b.lines[-1])
    for name, model in b.variants.items():
        absmax = b.timed(f"channel_absmax {name}", outliers.channel_absmax, model, calib)
        kinds = {}
        for layer, a in absmax.items():
            kind = layer.rsplit(".", 1)[-1]
            kinds.setdefault(kind, []).append((outliers.outlier_ratio(a), a.max().item()))
        for kind, rows in kinds.items():
            ratios = [r for r, _ in rows]
            b.lines.append(f"{name:<9} {kind:<10} max/median channel absmax: {min(ratios):6.1f} .. {max(ratios):6.1f}"
                           f"   max |x| {max(m for _, m in rows):7.1f}")
            print(b.lines[-1])
        # LLM.int8's view: features with |x| >= 6 in some calibration token, per layer
        counts = [int((a >= 6.0).sum()) for n, a in absmax.items() if n != "lm_head"]
        b.lines.append(f"{name:<9} features with |x| >= 6.0 per layer (of 256 or 768): min {min(counts)}, "
                       f"max {max(counts)}, total {sum(counts)} over {len(counts)} layers")
        print(b.lines[-1])
        # SmoothQuant's view: activation range vs weight range, per input channel of the q/k/v inputs
        w = torch.cat([model.model.layers[2].self_attn.q_proj.weight, model.model.layers[2].self_attn.k_proj.weight])
        a = absmax["model.layers.2.self_attn.q_proj"]
        ratio = a / w.abs().amax(0)
        b.lines.append(f"{name:<9} layer 2 q/k input: max|X_j| / max|W_j| median {ratio.median():.0f}, max {ratio.max():.0f}")
        print(b.lines[-1])


def section_w8a8(b: Bench):
    for name in ("original", "variant", "sparse"):
        model = b.variants[name]
        for gran in ("per_tensor", "per_token"):
            with activations.simulate(model, 8, 8, granularity=gran):
                b.add(f"W8A8 {gran} dynamic/{name}", [b.timed(f"ppl W8A8 {gran}", b.ppl, model)])
        values = []
        for d in DRAWS:
            scales = b.timed("calibrate static scales", activations.calibrate, model, b.calib(d))
            with activations.simulate(model, 8, 8, scales=scales):
                values.append(b.ppl(model))
        b.add(f"W8A8 per_tensor static/{name}", values, "3 calibration draws")


def section_llm_int8(b: Bench):
    for name in ("original", "variant", "sparse"):
        q = llm_int8.convert(copy.deepcopy(b.variants[name]), 6.0, outlier_weight="float")
        b.add(f"LLM.int8 (6.0), float outlier weights (paper) qlearn/{name}", [b.ppl(q)])
        for threshold, label in ((6.0, "LLM.int8 (6.0)"), (None, "vector-wise int8")):
            q = b.timed("llm_int8.convert", llm_int8.convert, copy.deepcopy(b.variants[name]), threshold)
            b.add(f"{label} qlearn/{name}", [b.timed(f"ppl {label} qlearn", b.ppl, q)])
            q = b.timed("llm_int8.to_bitsandbytes", llm_int8.to_bitsandbytes, copy.deepcopy(b.variants[name]),
                        threshold)
            b.add(f"{label} bitsandbytes/{name}", [b.timed(f"ppl {label} bitsandbytes", b.ppl, q)])


def section_factor(b: Bench):
    """LLM.int8's Figure 1, with outlier size in place of model size."""
    for f in (5.0, 10.0, 20.0, 50.0, 100.0):
        v = outliers.emulate_outliers(b.model, factor=f, mlp_factor=f)
        with activations.simulate(v, 8, 8):
            b.add(f"factor {f:g}: W8A8 per_tensor", [b.ppl(v)])
        with activations.simulate(v, 8, 8, granularity="per_token"):
            b.add(f"factor {f:g}: W8A8 per_token", [b.ppl(v)])
        for threshold, label in ((None, "vector-wise int8"), (6.0, "LLM.int8 (6.0)")):
            b.add(f"factor {f:g}: {label}", [b.ppl(llm_int8.convert(copy.deepcopy(v), threshold))])


def section_smoothquant(b: Bench):
    for name in ("original", "variant", "sparse"):
        values = []
        for d in DRAWS:
            s = b.timed("smoothquant.smooth", smoothquant.smooth, copy.deepcopy(b.variants[name]), b.calib(d), 0.5)
            with activations.simulate(s, 8, 8):
                values.append(b.ppl(s))
        b.add(f"SmoothQuant 0.5 + W8A8 per_tensor/{name}", values, "3 calibration draws")
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        for name in ("original", "variant"):
            s = smoothquant.smooth(copy.deepcopy(b.variants[name]), b.calib(0), alpha)
            with activations.simulate(s, 8, 8):
                b.add(f"SmoothQuant alpha {alpha:g} + W8A8 per_tensor/{name}", [b.ppl(s)], "draw 0")


def section_rotation(b: Bench):
    for name in ("original", "variant", "sparse"):
        model = b.variants[name]
        with activations.simulate(model, 4, None):
            b.add(f"W4A16 (weights only)/{name}", [b.ppl(model)])
        for a_bits in (8, 4):
            with activations.simulate(model, 4, a_bits, granularity="per_token"):
                b.add(f"W4A{a_bits} per_token/{name}", [b.ppl(model)])
        rotated = [b.timed("rotation.rotate", rotation.rotate, copy.deepcopy(model), seed) for seed in DRAWS]
        values = []
        for r in rotated:
            with activations.simulate(r, 4, None):
                values.append(b.ppl(r))
        b.add(f"rotate + W4A16 (weights only)/{name}", values, "3 rotation seeds")
        for a_bits in (8, 4):
            values = []
            for r in rotated:
                with activations.simulate(r, 4, a_bits, granularity="per_token"):
                    values.append(b.ppl(r))
            b.add(f"rotate + W4A{a_bits} per_token/{name}", values, "3 rotation seeds")
        values = []
        for r in rotated:
            with activations.simulate(r, 8, 8):
                values.append(b.ppl(r))
        b.add(f"rotate + W8A8 per_tensor/{name}", values, "3 rotation seeds")


def _rtn_keep(model, keep: dict[str, torch.Tensor], bits=3, group_size=128):
    """3-bit RTN of every block linear layer, with the input channels keep[name] left in full precision."""
    with torch.no_grad():
        for name, layer in qlearn.modules.linear_layers(model).items():
            w = layer.weight.data
            q = w_hat(rtn.quantize_rtn(w, bits, group_size))
            if name in keep:
                q[:, keep[name]] = w[:, keep[name]]
            layer.weight.data = q
    return model


def section_awq(b: Bench, bits=3, group_size=128):
    """AWQ Table 1: 1% of the input channels kept in 16 bits, chosen by activation, by weight, at random."""
    for name in ("original", "variant"):
        model = b.variants[name]
        layers = qlearn.modules.linear_layers(model)
        k = {n: max(1, round(0.01 * m.in_features)) for n, m in layers.items()}
        b.add(f"RTN {bits}-bit g{group_size}/{name}", [b.ppl(_rtn_keep(copy.deepcopy(model), {}, bits, group_size))])
        values = []
        for d in DRAWS:
            mean = outliers.channel_absmean(model, b.calib(d), exclude=("lm_head",))
            keep = {n: mean[n].topk(k[n]).indices for n in layers}
            values.append(b.ppl(_rtn_keep(copy.deepcopy(model), keep, bits, group_size)))
        b.add(f"RTN {bits}-bit g{group_size} + 1% fp16 by activation/{name}", values, "3 calibration draws")
        keep = {n: m.weight.detach().norm(dim=0).topk(k[n]).indices for n, m in layers.items()}
        b.add(f"RTN {bits}-bit g{group_size} + 1% fp16 by weight/{name}", [b.ppl(_rtn_keep(copy.deepcopy(model), keep, bits, group_size))])
        values = []
        for seed in DRAWS:
            g = torch.Generator().manual_seed(seed)
            keep = {n: torch.randperm(m.in_features, generator=g)[:k[n]] for n, m in layers.items()}
            values.append(b.ppl(_rtn_keep(copy.deepcopy(model), keep, bits, group_size)))
        b.add(f"RTN {bits}-bit g{group_size} + 1% fp16 at random/{name}", values, "3 seeds")
        values = []
        for d in DRAWS:
            q = copy.deepcopy(model)
            b.timed("AWQ (quantize_model awq)", quantize_model, q, "awq", bits, group_size, calib=list(b.calib(d, 32)))
            values.append(b.ppl(q))
        b.add(f"AWQ {bits}-bit g{group_size}/{name}", values, "3 calibration draws")


def section_gptq(b: Bench, bits=3):
    for name in ("original", "variant"):
        model = b.variants[name]
        for group_size in (None, 128):
            g = "per-row" if group_size is None else f"g{group_size}"
            q = copy.deepcopy(model)
            quantize_model(q, "rtn", bits, group_size)
            b.add(f"RTN {bits}-bit {g}/{name}", [b.ppl(q)])
            values = []
            for d in DRAWS:
                q = copy.deepcopy(model)
                b.timed(f"GPTQ {g} (quantize_model gptq)", quantize_model, q, "gptq", bits, group_size,
                        calib=list(b.calib(d, 32)))
                values.append(b.ppl(q))
            b.add(f"GPTQ {bits}-bit {g}/{name}", values, "3 calibration draws")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--tokens", type=int, default=8192, help="scored tokens (qlearn.perplexity's max_tokens)")
    parser.add_argument("--out", default="benchmarks/cpu/outliers.json")
    args = parser.parse_args()
    header = (f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}, ATEN_CPU_CAPABILITY={torch.backends.cpu.get_cpu_capability()}, "
              f"{args.tokens} scored tokens, {time.strftime('%Y-%m-%d')}")
    print(header, flush=True)
    start = time.perf_counter()
    b = Bench(args.tokens)
    if "natural" not in args.only:
        b.spreads["fp32/original"] = Spread((b.ppl(b.model),), "fp32/original")
    for name in args.only:
        b.lines.append(f"## {name}")
        print(b.lines[-1], flush=True)
        globals()[f"section_{name}"](b)
    b.lines.append("## CPU seconds (process time, all threads) of one step")
    b.lines += [f"{k:<44} {v:7.2f}" for k, v in b.seconds.items()]
    wall = time.perf_counter() - start
    b.lines.append(f"total wall time {wall:.0f} s")
    print("\n".join(b.lines[-len(b.seconds) - 2:]))
    experiment.record(args.out, b.spreads, command="python benchmarks/outliers.py " + " ".join(
        f"--only {' '.join(args.only)}".split()) + f" --tokens {args.tokens}", header=header,
        cpu_seconds=b.seconds, lines=b.lines)


if __name__ == "__main__":
    main()
