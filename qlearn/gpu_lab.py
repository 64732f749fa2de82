"""Measuring what fine-tuning really costs on a GPU: peak memory and step time per method.

`measure(model_dir, method, ...)` loads a saved model the way a learner would
(`from_pretrained`, with `BitsAndBytesConfig` for QLoRA), runs a few optimizer steps on random
tokens and reports, from torch's CUDA allocator:

    weights_bytes   memory allocated after loading (weights + adapters, before any step)
    peak_bytes      torch.cuda.max_memory_allocated() over the steps (what must fit on the card)
    step_seconds    median wall time of the timed steps (after one warm-up step)

Methods ("full", "lora", "qlora") match `qlearn.memory.estimate`; "qlora" uses QLoRA's recipe
(NF4, double quantization, bf16 compute) and `peft.prepare_model_for_kbit_training`.
`grad_checkpointing` recomputes each block's activations in the backward pass; `optimizer` is
"adamw" (torch, fused) or "paged_adamw_8bit" / "paged_adamw_32bit" (bitsandbytes).
Needs a CUDA GPU; the CPU path of the course shows the recorded results in benchmarks/gpu/.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

__all__ = ["LLAMA_1B", "Measurement", "attention_kernel", "build_random_llama", "label", "measure", "predicted", "train_steps"]

# The shape of Llama 3.2 1B (hidden 2048, 16 layers, GQA 32/8 heads, MLP 8192, vocabulary 128256,
# tied embeddings): 1.24B parameters, built with random weights (no download).
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048,
                tie_word_embeddings=True, rope_theta=500000.0)
METHODS = ("full", "lora", "qlora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Measurement:
    method: str
    batch_size: int
    seq_len: int
    grad_checkpointing: bool
    optimizer: str
    lora_r: int | None
    params: int
    trainable: int
    weights_bytes: int
    peak_bytes: int
    step_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def build_random_llama(path, shape: dict = LLAMA_1B, seed: int = 0) -> int:
    """Save a randomly initialised Llama of `shape` in bf16 to `path`; return its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _optimizer(name: str, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    import bitsandbytes as bnb

    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=1e-5)
    if name == "paged_adamw_32bit":
        return bnb.optim.PagedAdamW32bit(params, lr=1e-5)
    raise ValueError(f"optimizer must be 'adamw', 'paged_adamw_8bit' or 'paged_adamw_32bit', got {name!r}")


def measure(model_dir, method: str, *, batch_size: int = 4, seq_len: int = 512, lora_r: int = 16,
            grad_checkpointing: bool = False, optimizer: str = "adamw", steps: int = 4) -> Measurement:
    """Load, train `steps` steps on random tokens, and report memory and time (see module doc)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("measure() needs a CUDA GPU: peak memory is read from torch's CUDA allocator")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0}}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    params = sum(p.numel() for p in model.parameters())
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpointing)
    elif grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if method in ("lora", "qlora"):
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=LORA_TARGETS))
    model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(optimizer, trainable)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated() - base
    times, _ = train_steps(model, opt, steps=steps + 1, batch_size=batch_size, seq_len=seq_len, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    result = Measurement(method, batch_size, seq_len, grad_checkpointing, optimizer,
                         lora_r if method != "full" else None, params, sum(p.numel() for p in trainable),
                         weights, peak, statistics.median(times[1:]))
    del model, opt
    torch.cuda.empty_cache()
    return result


def train_steps(model, opt, *, steps: int, batch_size: int, seq_len: int, device="cuda",
                seed: int = 0) -> tuple[list[float], list[float]]:
    """Run `steps` optimizer steps of causal-LM loss on random tokens; return each step's wall seconds
    (on CUDA between synchronizations, so the kernels are counted) and its loss."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(seed)
    times, losses = [], []
    model.train()
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device, generator=gen)
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return times, losses


def label(row: dict) -> str:
    """A short name of a measured configuration, e.g. "qlora +ckpt+paged8 b4"."""
    extra = " +ckpt" if row["grad_checkpointing"] else ""
    extra += "+paged8" if row["optimizer"].endswith("8bit") else ""
    return f"{row['method']}{extra} b{row['batch_size']}"


def attention_kernel(config, method: str) -> str:
    """The SDPA kernel CUDA runs in training, as `qlearn.memory.estimate` names it.

    "math" for QLoRA on a model with grouped-query attention: after prepare_model_for_kbit_training
    q, k and v are fp32, flash attention takes only 16-bit inputs and the memory-efficient kernel does
    not take enable_gqa, so PyTorch falls back to the math kernel. "fused" otherwise (bf16: flash).
    """
    gqa = (config.num_key_value_heads or config.num_attention_heads) < config.num_attention_heads
    return "math" if method == "qlora" and gqa else "fused"


def predicted(config, row: dict):
    """`qlearn.memory.estimate` for the configuration of a measurement (a `Measurement.as_dict()`)."""
    from .memory import estimate

    return estimate(config, row["method"], batch_size=row["batch_size"], seq_len=row["seq_len"],
                    optimizer="paged_adamw_8bit" if row["optimizer"].endswith("8bit") else "adamw",
                    lora_r=row["lora_r"], grad_checkpointing=row["grad_checkpointing"],
                    attention=attention_kernel(config, row["method"]))
