"""LoRA's family on the embedded model's real weights: agreement with PEFT, LoftQ's and QPiSSA's quantization
errors, QA-LoRA's merge into the zero points.

    python benchmarks/lora_family.py [--out benchmarks/cpu/lora_family.json]

1. PEFT: the tiny model with every projection adapted (r=8, alpha=16) by qlearn and by PEFT 0.21 with the
   same A, B (random, std 0.02) and DoRA magnitude; the max |logit difference| on 8 task prompts per
   variant (LoRA, rsLoRA, DoRA, DoRA + rsLoRA); PiSSA's B A and residual against PEFT's init.
2. LoftQ: ||W - (Q + s B A)||_F / ||W||_F, summed over the 42 block projections (squares summed), per
   iteration 1..5, at 4 bits (NF4 blocks of 64) and 2 bits (RTN asymmetric groups of 64), against QLoRA's
   init (Q = quant(W), B = 0); and PEFT's LoftQ, which ignores s (peft#1982): with alpha=16, r=8 its layer
   computes Q + 2 L R, whose error is printed too.
3. QPiSSA: ||W - (quant(W_res) + s B A)|| against ||W - quant(W)||, same sums, r = 8 and 64.
4. QA-LoRA: apply_qalora (RTN, 4 bits, groups of 64) with random B (std 0.02); codes changed by merge()
   and the max |logit difference| merged vs unmerged for float32, fp16, bf16 and integer zero points.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import qlearn
from qlearn import lora, qalora, tasks
from qlearn.quant import nf4, quantize

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANT = {4: lambda w: nf4.quantize_nf4(w, 64).dequantize(),
         2: lambda w: quantize(w, 2, symmetric=False, group_size=64).dequantize()}


def peft_agreement(base, batch) -> dict:
    out = {}
    for name, flags in [("LoRA", {}), ("rsLoRA", {"use_rslora": True}), ("DoRA", {"use_dora": True}),
                        ("DoRA + rsLoRA", {"use_dora": True, "use_rslora": True})]:
        qlearn.seed_everything(0)
        ours = lora.apply_lora(copy.deepcopy(base), TARGETS, r=8, alpha=16, **flags)
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                **flags))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for lname, layer in lora.lora_layers(ours).items():
                layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.02)
                if layer.use_dora:
                    layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.magnitude.shape, generator=g))
                p = theirs.get_submodule("base_model.model." + lname)
                p.lora_A["default"].weight.copy_(layer.A)
                p.lora_B["default"].weight.copy_(layer.B)
                if layer.use_dora:
                    p.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
            a, b = ours(**batch).logits, theirs(**batch).logits
        out[name] = {"max_logit_diff": (a - b).abs().max().item(), "logit_range": a.abs().max().item()}
    # PiSSA: the adapter product and the residual of every layer, against PEFT's init
    qlearn.seed_everything(0)
    ours = lora.apply_lora(copy.deepcopy(base), TARGETS, r=8, alpha=16, init="pissa")
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                            init_lora_weights="pissa"))
    ba = res = 0.0
    for lname, layer in lora.lora_layers(ours).items():
        p = theirs.get_submodule("base_model.model." + lname)
        theirs_ba = p.lora_B["default"].weight @ p.lora_A["default"].weight
        ba = max(ba, (layer.B @ layer.A - theirs_ba).abs().max().item())
        res = max(res, (layer.base.weight - p.base_layer.weight).abs().max().item())
    out["PiSSA"] = {"max_BA_diff": ba, "max_residual_diff": res}
    return out


def weights(base) -> list[torch.Tensor]:
    return [m.weight.detach().float() for n, m in base.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]


def relative(errors: list[float], norms: list[float]) -> float:
    """sqrt(sum e^2) / sqrt(sum ||W||^2): one number for all layers."""
    return math.sqrt(sum(e * e for e in errors)) / math.sqrt(sum(n * n for n in norms))


@torch.no_grad()
def loftq_and_qpissa(base) -> dict:
    ws = weights(base)
    norms = [w.norm().item() for w in ws]
    out = {}
    for bits in (4, 2):
        qlora = relative([(w - QUANT[bits](w)).norm().item() for w in ws], norms)
        per_iter = [[] for _ in range(5)]
        peft_style = []  # PEFT's layer at scaling 2: Q + 2 L R with L R = SVD_r(W - Q) (peft#1982)
        for w in ws:
            q, A, B, errors = lora.loftq_init(w, 8, 2.0, bits, iters=5)
            for t, e in enumerate(errors):
                per_iter[t].append(e)
            q1, A1, B1, _ = lora.loftq_init(w, 8, 1.0, bits, iters=1)
            peft_style.append((w - (q1 + 2.0 * B1 @ A1)).norm().item())
        out[f"loftq_{bits}bit"] = {"qlora_init": qlora,
                                   "per_iteration": [relative(e, norms) for e in per_iter],
                                   "peft_ignoring_scaling_1_iter": relative(peft_style, norms)}
        for r in (8, 64):
            plain, qpissa = [], []
            for w in ws:
                A, B, residual = lora.pissa_init(w, r, 2.0)
                plain.append((w - QUANT[bits](w)).norm().item())
                qpissa.append((w - (QUANT[bits](residual) + 2.0 * B @ A)).norm().item())
            out[f"qpissa_{bits}bit_r{r}"] = {"plain": relative(plain, norms),
                                             "qpissa": relative(qpissa, norms)}
    return out


@torch.no_grad()
def qalora_merge(base, batch) -> dict:
    model = qalora.apply_qalora(copy.deepcopy(base), r=8, alpha=16, bits=4, group_size=64)
    g = torch.Generator().manual_seed(1)
    for layer in qalora.qalora_layers(model).values():
        layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.02)
    logits = model(**batch).logits
    out = {"layers": len(qalora.qalora_layers(model)), "codes": 0}
    for name, dtype in [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
                        ("int32", torch.int32)]:
        merged = qalora.merge_qalora(copy.deepcopy(model), dtype)
        changed = total = 0
        for lname, layer in qalora.qalora_layers(model).items():
            q = merged.get_submodule(lname).q
            changed += int((q != layer.base.q).sum())
            total += q.numel()
        out["codes"] = total
        first = next(iter(qalora.qalora_layers(model).values()))
        out[name] = {"codes_changed": changed,
                     "max_logit_diff": (merged(**batch).logits - logits).abs().max().item(),
                     "bits_per_param": first.merge(dtype).bits_per_param()}
    out["logit_range"] = logits.abs().max().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/cpu/lora_family.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine spin and slow everything down
    base, tok = qlearn.load_model("tiny")
    base.requires_grad_(False)
    batch = tasks.encode(tok, tasks.load("to_dict").test[:8])
    result = {"peft": peft_agreement(base, batch), **loftq_and_qpissa(base),
              "qalora": qalora_merge(base, batch)}
    print(json.dumps(result, indent=1))
    result["meta"] = {"command": "python benchmarks/lora_family.py", "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
