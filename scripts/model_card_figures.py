"""Measure the figures of data/README.md (the model card) on this machine's CPU.

    python scripts/model_card_figures.py > benchmarks/cpu/model_card.txt

Perplexity (qlearn.perplexity: the first 8192 tokens of data/val.txt in windows of 256) of the
embedded model in float32, bfloat16, bitsandbytes NF4 / FP4 (QLoRA's settings) and LLM.int8, and
with every linear layer of the blocks rounded to per-tensor symmetric INT4 (round to nearest);
then the tasks' exact match before and after a LoRA run (PEFT, r=8, alpha=16, all projections,
AdamW lr 3e-3, batches of 16, 150 steps) and its wall time.
"""

from __future__ import annotations

import platform
import time

import torch
from peft import LoraConfig, get_peft_model

import qlearn
from qlearn import tasks
from qlearn.quant import quantize


def int4_per_tensor(model):
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(quantize(mod.weight, bits=4, symmetric=True).dequantize())
    return model


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("## validation perplexity")
    rows = [("float32", {}), ("bfloat16", {"dtype": torch.bfloat16}), ("nf4 (bitsandbytes)", {"quantization": "nf4"}),
            ("fp4 (bitsandbytes)", {"quantization": "fp4"}), ("int8 (LLM.int8)", {"quantization": "int8"})]
    for label, kw in rows:
        model, tok = qlearn.load_model("tiny", device="cpu", **kw)
        print(f"{label:<28} {qlearn.perplexity(model, tok):8.2f}")
    model, tok = qlearn.load_model("tiny", device="cpu")
    print(f"{'int4 per-tensor RTN':<28} {qlearn.perplexity(int4_per_tensor(model), tok):8.2f}")
    print("## tasks: exact match on the 200 test examples")
    for name in tasks.TASKS:
        qlearn.seed_everything(0)
        model, tok = qlearn.load_model("tiny", device="cpu")
        before = tasks.evaluate(model, tok, name)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        batches = tasks.batches(tok, name, 16)
        model.train()
        t0 = time.perf_counter()
        for _ in range(150):
            model(**next(batches)).loss.backward()
            opt.step()
            opt.zero_grad()
        seconds = time.perf_counter() - t0
        after = tasks.evaluate(model, tok, name)
        print(f"{name:<10} base {before:6.1%}   LoRA {after:6.1%}   training {seconds:5.1f} s")


if __name__ == "__main__":
    main()
