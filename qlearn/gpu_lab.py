"""Measuring what fine-tuning really costs on a GPU: peak memory and step time per method.

`measure(model_dir, method, ...)` loads a saved model the way a learner would (`from_pretrained`,
with `BitsAndBytesConfig` for QLoRA), runs a few optimizer steps on random tokens and reports, from
torch's CUDA allocator:

    baseline_bytes        allocated before loading, after gc.collect() and empty_cache() (should be ~0:
                          anything left over from an earlier run would be counted as this run's)
    weights_bytes         allocated after loading (weights + adapters, before any step) - baseline
    peak_bytes            torch.cuda.max_memory_allocated() over the steps - baseline (what must fit)
    peak_reserved_bytes   torch.cuda.max_memory_reserved() - reserved at the baseline: what the caching
                          allocator took from the GPU (peak + its fragmentation and cached blocks)
    forward_bytes         allocated at the end of the last step's forward pass minus just before it:
                          what the forward keeps for the backward (activations, logits, autocast copies)
    step_seconds          median wall time of the timed steps (after one warm-up step)
    left_after_bytes      allocated once the model and optimizer are deleted and released - baseline
                          (~0; a leak would show here and in the next row's baseline)
    sdpa                  the scaled-dot-product-attention kernel(s) the forward ran (aten op names)

The learner's usual path is the default (`autocast=True`): Trainer / TRL with `bf16=True` run the
forward pass under `torch.autocast("cuda", dtype=torch.bfloat16)` (accelerate wraps model.forward) and
the backward pass and optimizer step outside it. The weights keep the dtype they were loaded in:
bf16 here (the checkpoint's dtype), fp32 for what PEFT and prepare_model_for_kbit_training keep in
fp32 (LoRA's A and B, QLoRA's norms, embeddings and head); those fp32 tensors are the master weights
and autocast casts them to bf16 for each matmul. `weights_dtype="fp32"` loads a full model in fp32
(Trainer's mixed precision with fp32 master weights). `autocast=False` is the variant without
autocast: every op runs in the dtype of its inputs, so QLoRA's fp32 residual stream makes fp32 q, k, v
and, with grouped-query attention, PyTorch's math SDPA kernel (`attention_kernel`).

Methods ("full", "lora", "qlora") match `qlearn.memory.estimate`; "qlora" uses QLoRA's recipe (NF4,
double quantization, bf16 compute) and `peft.prepare_model_for_kbit_training`. `grad_checkpointing`
recomputes each block's activations in the backward pass; `optimizer` is "adamw" (torch, fused: what
Trainer uses by default) or "paged_adamw_8bit" / "paged_adamw_32bit" (bitsandbytes).
Needs a CUDA GPU; the CPU path of the course shows the recorded results in benchmarks/gpu/.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["LLAMA_1B", "Measurement", "attention_kernel", "build_random_llama", "label", "load_for_training",
           "measure", "measure_trainer", "predicted", "saved_tensors", "sdpa_ops", "train_steps"]

# The shape of Llama 3.2 1B (hidden 2048, 16 layers, GQA 32/8 heads, MLP 8192, vocabulary 128256,
# tied embeddings): 1.24B parameters, built with random weights (no download).
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048,
                tie_word_embeddings=True, rope_theta=500000.0)
METHODS = ("full", "lora", "qlora")
WEIGHT_DTYPES = ("bf16", "fp32")
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
    autocast: bool = True
    weights_dtype: str = "bf16"
    baseline_bytes: int = 0
    peak_reserved_bytes: int = 0
    forward_bytes: int = 0
    sdpa: list[str] | dict = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    saved: dict = field(default_factory=dict)  # saved_tensors() of one forward at the same batch
    left_after_bytes: int = 0  # allocated after the run is deleted and released, above the baseline (~0: no leak)

    def as_dict(self) -> dict:
        return asdict(self)


def build_random_llama(path, shape: dict = LLAMA_1B, seed: int = 0) -> int:
    """Save a randomly initialised Llama of `shape` in bf16 to `path`; return its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    _release()
    return n


def _release() -> None:
    """Free what Python still holds (reference cycles) and hand the allocator's cached blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _optimizer(name: str, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, fused=next(iter(params)).is_cuda)
    import bitsandbytes as bnb

    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=1e-5)
    if name == "paged_adamw_32bit":
        return bnb.optim.PagedAdamW32bit(params, lr=1e-5)
    raise ValueError(f"optimizer must be 'adamw', 'paged_adamw_8bit' or 'paged_adamw_32bit', got {name!r}")


def load_for_training(model_dir, method: str, *, lora_r: int = 16, grad_checkpointing: bool = False,
                      weights_dtype: str = "bf16", device="cuda"):
    """The model as a learner prepares it for `method` (see the module doc); returns the model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if weights_dtype not in WEIGHT_DTYPES or (weights_dtype == "fp32" and method == "qlora"):
        raise ValueError(f"weights_dtype must be one of {WEIGHT_DTYPES} ('bf16' for 'qlora': its compute dtype), "
                         f"got {weights_dtype!r} for method {method!r}")
    device = torch.device(device)
    kwargs = {"dtype": torch.float32 if weights_dtype == "fp32" else torch.bfloat16,
              "device_map": {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpointing)
    elif grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if method in ("lora", "qlora"):
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=LORA_TARGETS))
    model.config.use_cache = False
    return model


def _warm_cublas() -> None:
    """cuBLAS takes a workspace from torch's pool the first time a thread multiplies (the forward runs in
    this thread, the backward in autograd's): take both before the baseline, as memory.peak_memory does."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(16, 16, device="cuda", dtype=dtype, requires_grad=True)
        torch.nn.functional.linear(x, x, x[0]).sum().backward()
    del x
    torch.cuda.synchronize()


def _guarded(fn):
    """fn(), or {"error": ...} if it fails (a diagnostic must not lose the measurement it follows)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        _release()
        return {"error": f"{type(err).__name__}: {err}"}


def measure(model_dir, method: str, *, batch_size: int = 4, seq_len: int = 512, lora_r: int = 16,
            grad_checkpointing: bool = False, optimizer: str = "adamw", steps: int = 4, autocast: bool = True,
            weights_dtype: str = "bf16") -> Measurement:
    """Load, train `steps` steps on random tokens, and report memory and time (see the module doc)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("measure() needs a CUDA GPU: peak memory is read from torch's CUDA allocator")
    _warm_cublas()
    _release()  # Step 1: a clean baseline (the old harness counted an earlier run's leftovers)
    torch.cuda.reset_peak_memory_stats()
    base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    model = load_for_training(model_dir, method, lora_r=lora_r, grad_checkpointing=grad_checkpointing,
                              weights_dtype=weights_dtype)  # Step 2: load as a learner does
    params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(optimizer, trainable)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated() - base
    probe: list[dict] = []  # Step 3: train, reading the allocator after each forward
    times, losses = train_steps(model, opt, steps=steps + 1, batch_size=batch_size, seq_len=seq_len,
                                device="cuda", autocast=autocast, probe=probe)
    peak = torch.cuda.max_memory_allocated() - base
    peak_reserved = torch.cuda.max_memory_reserved() - base_reserved
    # Step 4: after the peak is read, which attention kernel ran and what the forward saves
    sdpa = _guarded(lambda: sdpa_ops(model, batch_size=1, seq_len=seq_len, device="cuda", autocast=autocast))
    saved = _guarded(lambda: saved_tensors(model, batch_size=batch_size, seq_len=seq_len, device="cuda",
                                           autocast=autocast))
    result = Measurement(method, batch_size, seq_len, grad_checkpointing, optimizer,
                         lora_r if method != "full" else None, params, sum(p.numel() for p in trainable),
                         weights, peak, statistics.median(times[1:]), autocast, weights_dtype, base, peak_reserved,
                         probe[-1]["after_forward"] - probe[-1]["before"], sdpa, [round(v, 4) for v in losses], saved)
    del model, opt, trainable
    _release()
    result.left_after_bytes = torch.cuda.memory_allocated() - base
    return result


def measure_trainer(model_dir, method: str, *, batch_size: int = 4, seq_len: int = 512, lora_r: int = 16,
                    grad_checkpointing: bool = False, steps: int = 4, device="cuda") -> dict:
    """The same measurement through transformers.Trainer itself (bf16=True, its default fused AdamW, no
    logging or saving): the check that `measure`'s autocast loop is the path a learner's Trainer takes.
    Returns baseline_bytes, weights_bytes, peak_bytes, peak_reserved_bytes (as `measure`; on a CPU 0),
    step_seconds (median after the first step) and the losses Trainer logged."""
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        _warm_cublas()
    _release()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stat = (lambda f: f()) if cuda else (lambda f: 0)
    base, base_reserved = stat(torch.cuda.memory_allocated), stat(torch.cuda.memory_reserved)
    model = load_for_training(model_dir, method, lora_r=lora_r, grad_checkpointing=grad_checkpointing, device=device)
    weights = stat(torch.cuda.memory_allocated) - base
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in
            torch.randint(0, model.config.vocab_size, ((steps + 1) * batch_size, seq_len), generator=gen)]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps + 1,
                                 learning_rate=1e-5, bf16=True, logging_steps=1, report_to=[], save_strategy="no",
                                 dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not cuda,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()])
        trainer.train()
        losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    result = {"method": method, "batch_size": batch_size, "seq_len": seq_len, "grad_checkpointing": grad_checkpointing,
              "optimizer": args.optim.value if hasattr(args.optim, "value") else str(args.optim), "lora_r": lora_r,
              "baseline_bytes": base, "weights_bytes": weights, "peak_bytes": stat(torch.cuda.max_memory_allocated) - base,
              "peak_reserved_bytes": stat(torch.cuda.max_memory_reserved) - base_reserved,
              "step_seconds": statistics.median(times[1:]) if len(times) > 1 else None, "losses": losses}
    del trainer, model
    _release()
    return result


def train_steps(model, opt, *, steps: int, batch_size: int, seq_len: int, device="cuda", seed: int = 0,
                autocast: bool = False, probe: list | None = None) -> tuple[list[float], list[float]]:
    """Run `steps` optimizer steps of causal-LM loss on random tokens; return each step's wall seconds
    (on CUDA between synchronizations, so the kernels are counted) and its loss.

    autocast=True runs the forward (loss included) under torch.autocast(device, bfloat16) and the
    backward and the optimizer step outside it, as Trainer/TRL with bf16=True do. On CUDA, `probe` (a
    list) gets one dict per step: bytes allocated just before the forward and at its end."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(seed)
    times, losses = [], []
    model.train()
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device, generator=gen)
        sync()
        before = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        if probe is not None and cuda:
            sync()
            probe.append({"before": before, "after_forward": torch.cuda.memory_allocated()})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        del loss
    return times, losses


def sdpa_ops(model, *, batch_size: int = 1, seq_len: int = 128, device="cuda", autocast: bool = True) -> list[str]:
    """The aten scaled-dot-product-attention kernels one training forward runs, e.g.
    ["aten::_scaled_dot_product_flash_attention"] or ["aten::_scaled_dot_product_attention_math"]
    (read with torch.profiler's CPU activity, which records every aten op on any device)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
    del loss
    return sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")})


def saved_tensors(model, *, batch_size: int, seq_len: int, device="cuda", autocast: bool = True,
                  top: int = 12) -> dict:
    """What autograd saves for the backward pass in one training forward, read with
    torch.autograd.graph.saved_tensors_hooks and counted once per storage:

        total_bytes       bytes of the distinct storages saved, parameters excluded (they exist anyway);
                          autocast's 16-bit copies of weights are not parameters: they are in it
        by_dtype          the same bytes split by dtype
        parameter_bytes   saved tensors that are the model's parameters (not counted in total_bytes)
        largest           the `top` largest storages: shape, dtype, bytes

    Meant for runs without gradient checkpointing: torch.utils.checkpoint installs saved-tensor hooks of
    its own inside each block, and what the outer hooks then see is not what the step keeps."""
    device = torch.device(device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple] = {}
    keep: list[torch.Tensor] = []  # alive until the count is done (a freed storage's address can be reused)
    param_bytes = 0

    def pack(t):
        # Step 1: count each storage once; hand autograd an index, not the tensor: a pack hook that returns
        # a saved output itself makes a tensor -> grad_fn -> tensor cycle gc cannot see (measured on the
        # H200: every census leaked its forward and the model)
        nonlocal param_bytes
        keep.append(t)
        try:
            storage = t.untyped_storage()
        except Exception:  # noqa: BLE001 - a tensor without a plain storage (a subclass): not counted
            return len(keep) - 1
        ptr = storage.data_ptr()
        if ptr in params:
            param_bytes += 0 if ptr in seen else storage.nbytes()
            seen.setdefault(ptr, None)
        elif ptr not in seen:
            seen[ptr] = (list(t.shape), str(t.dtype).removeprefix("torch."), storage.nbytes())
        return len(keep) - 1

    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda i: keep[i]):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
    del loss  # Step 2: free the graph, then what it saved
    keep.clear()
    rows = [r for r in seen.values() if r is not None]
    by_dtype: dict[str, int] = {}
    for _, dtype, n in rows:
        by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    largest = sorted(rows, key=lambda r: -r[2])[:top]
    return {"total_bytes": sum(r[2] for r in rows), "by_dtype": by_dtype, "parameter_bytes": param_bytes,
            "largest": [{"shape": s, "dtype": d, "bytes": n} for s, d, n in largest]}


def label(row: dict) -> str:
    """A short name of a measured configuration, e.g. "qlora +ckpt+paged8 b4" (the real path, autocast),
    "qlora b4 no-autocast", "full fp32w b4"."""
    extra = " +ckpt" if row["grad_checkpointing"] else ""
    extra += "+paged8" if row["optimizer"].endswith("8bit") else ""
    extra += " fp32w" if row.get("weights_dtype", "bf16") == "fp32" else ""
    tail = "" if row.get("autocast", False) or "autocast" not in row else " no-autocast"
    return f"{row['method']}{extra} b{row['batch_size']}{tail}"


def attention_kernel(config, method: str, autocast: bool = False) -> str:
    """The SDPA kernel CUDA runs in training, as `qlearn.memory.estimate` names it.

    Without autocast, "math" for QLoRA on a model with grouped-query attention: after
    prepare_model_for_kbit_training q, k and v are fp32, flash attention takes only 16-bit inputs and
    the memory-efficient kernel does not take enable_gqa, so PyTorch falls back to the math kernel.
    Under bf16 autocast q, k and v come out of bf16 matmuls, so a fused kernel (flash) runs: "fused".
    """
    gqa = (config.num_key_value_heads or config.num_attention_heads) < config.num_attention_heads
    return "math" if method == "qlora" and gqa and not autocast else "fused"


def predicted(config, row: dict):
    """`qlearn.memory.estimate` for the configuration of a measurement (a `Measurement.as_dict()`; rows
    recorded before autocast was measured have no "autocast" key: they ran without it)."""
    from .memory import estimate

    autocast = row.get("autocast", False)
    kwargs = {"autocast": True} if autocast else {}
    return estimate(config, row["method"], batch_size=row["batch_size"], seq_len=row["seq_len"],
                    optimizer="paged_adamw_8bit" if row["optimizer"].endswith("8bit") else "adamw",
                    lora_r=row["lora_r"], grad_checkpointing=row["grad_checkpointing"],
                    attention=attention_kernel(config, row["method"], autocast),
                    weight_format="fp32" if row.get("weights_dtype") == "fp32" else None, **kwargs)
