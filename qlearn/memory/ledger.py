"""The memory ledger of training or running a Llama, term by term.

`estimate(model_or_config, method, batch_size=..., seq_len=...) -> Ledger`: the bytes a training step
(or, with method="inference", a forward pass) needs, term by term, for a Llama-shaped decoder
(hidden h, MLP width m, L blocks, n heads, key/value width h_kv, vocabulary V, T = batch x seq tokens).

    weights      params x bytes of the format. 4-bit/8-bit formats apply to the block linear layers
                 only (what bitsandbytes quantizes); the rest (embeddings, head, norms) stays bf16, or
                 fp32 for "qlora" (peft.prepare_model_for_kbit_training casts it up). LoRA's A and B
                 are fp32 (PEFT casts 16-bit adapters to fp32).
    gradients    trainable params x their dtype's bytes.
    optimizer    torch AdamW ("adamw"): 2 states in the parameter's dtype (8 bytes/param for fp32, 4
                 for bf16) + a 4-byte step counter per tensor; with mixed_precision=True the classic
                 recipe (ZeRO, Rajbhandari et al. 2020): fp32 master weights + fp32 states = 12
                 bytes/param. bitsandbytes "adamw_32bit"/"paged_adamw_32bit": 8 bytes/param;
                 "adamw_8bit"/"paged_adamw_8bit": 2 x (1 + 4/256) bytes/param (8-bit blockwise
                 states, blocks of 256), fp32 states for tensors under 4096 values. Paged states
                 live in CUDA unified memory: on the GPU, but not counted by
                 torch.cuda.max_memory_allocated.
    activations  tensors autograd saves for the backward pass, in bytes per token and block, read off
                 transformers' Llama code (RMSNorm in fp32, SwiGLU MLP, fused SDPA attention that keeps
                 q, k, v, its output and a 4-byte logsumexp per head; no dropout), the accounting of
                 Korthikanti et al. 2022 ("Reducing Activation Recomputation") adapted to Llama.
                 a = bytes of an activation (2 for bf16, 4 for fp32), q width h_q = n x head_dim:
        trained block   8h + 4ah + 2a h_q + 2a h_kv + 4am + 4n
                        (each norm: its fp32 input 4h + normalized a h; inputs of q/k/v, o, gate/up, down;
                        rotated q, k, v; SiLU input and output; up output; logsumexp)
        LoRA block      8h + 2a h_q + 2a h_kv + 3am + 4n + adapter inputs + 28r
                        (frozen norms keep only their fp32 input; adapter inputs: a(2h + m) when the
                        adapters share the activations' dtype, else PEFT casts x to fp32 once per
                        adapter: 4(5h + h_q + m); 7 fp32 A outputs of width r)
                 QLoRA after prepare_model_for_kbit_training runs the residual stream in fp32 (a = 4).
                 Frozen blocks before the first trained one save nothing; with LoRA the first norm of
                 block 0 saves nothing either (its input needs no gradient). After the last block:
                 the final norm (4h + a h when trained, 4h frozen) and the head's input (a h if trained).
                 grad_checkpointing=True keeps only each block's input (a h per token and block).
    logits       12 V bytes per token: at the start of the backward pass the fp32 log-probabilities,
                 their gradient and the logits' fp32 gradient coexist (transformers upcasts logits to
                 fp32 in the loss). With a large vocabulary this is often the biggest single buffer.
    workspace    the backward pass of one block, once the logits are gone: its gradient buffers,
                 a(2m + 2h) per token (LoRA: 2(2m + 2h) + 4m, the adapters' fp32 gradients), and with
                 grad checkpointing its recomputed activations plus its output and gradient (2a h).
    total        the peak. Gradients are born in the backward pass as activations die, so the two do
                 not peak together: total = weights + optimizer + max(activations + max(logits,
                 workspace), gradients).

Checked on the CPU against every allocation torch makes (`peak_memory`, tests/test_memory.py): within
0.5% for full, freeze, LoRA and QLoRA (bitsandbytes' CPU backend), with and without checkpointing, in
bf16 and fp32; within 8% with a toy 256-token vocabulary, where the workspace term decides the peak.
Not counted: the CUDA context (~0.5 GB outside torch's allocator), allocator fragmentation, kernel
workspaces, temporaries inside one operation (e.g. bitsandbytes' dequantized 16-bit weight of one layer),
the rotary cos/sin tables; with tied embeddings trained in full, the end of the backward pass briefly
holds two more V x h gradients (the embedding's and its sum with the head's). On a GPU, attention
is fused by default (attention="fused": flash, cuDNN or memory-efficient SDPA, no seq x seq matrix kept).
    attention="math": PyTorch's math SDPA kernel, which CUDA falls back to when no fused kernel takes the
                 inputs: fp32 q/k/v with grouped-query attention (flash needs 16-bit, memory-efficient
                 does not take enable_gqa), as in QLoRA after prepare_model_for_kbit_training. It keeps
                 the fp32 probabilities (4 n T per token and block, T = seq_len), and q and k scaled by
                 sqrt(1/sqrt(d)) and v, all repeated to n heads (3 x 4 h_q), in place of the fused
                 kernel's rotated q, k, v and logsumexp; the attention output is kept either way (o's
                 input). So attention terms 4(n T + 4 h_q) instead of 4(2 h_q + 2 h_kv) + 4n. Read off
                 the tensors autograd saves (saved_tensors_hooks) and checked on the CPU with the math
                 backend forced (tests/test_memory.py): within 2% without checkpointing. With
                 checkpointing the peak can move into the backward of one recomputed block, whose
                 n x T x T gradients are not modeled (tiny shape on the CPU: +8% at T = 256, -15% at 512).
                 Modeled for fp32 activations only: the math kernel upcasts 16-bit inputs, and on a GPU
                 a fused kernel takes 16-bit ones.
autocast=True: the forward under torch.autocast(bfloat16), as Trainer/TRL with bf16=True run it (the
                 learner's usual path; the default False is the forward in the weights' dtypes). Weights
                 keep their dtype; every matmul (linear, SDPA) runs in bf16 and saves bf16 inputs. Read off
                 the tensors autograd saves (gpu_lab.saved_tensors) in transformers' Llama and PEFT's LoRA:
        LoRA block      8h + 2(2 h_q + 2 h_kv) + 4n + 6m + 2(5h + h_q + m) + 14r
                        (as above with a = 2, but each adapter's A saves the bf16 cast of its fp32 input
                        instead of the fp32 input, and the 7 A outputs are bf16)
        QLoRA block     8h + 2(2 h_q + 2 h_kv) + 4n + 12m + 2(5h + m) + 14r
                        (prepare_model_for_kbit_training keeps the residual stream, the norms and
                        bitsandbytes' outputs in fp32: the fp32 norm inputs 8h, the fp32 MLP (gate, SiLU
                        output, up: 12m); q, k, v reach SDPA as bf16 casts, so the fused kernel runs and
                        keeps bf16 q, k, v, output and a 4-byte logsumexp per head; each adapter saves
                        the bf16 cast of its input, except o's, which is the bf16 attention output itself)
                 and outside the blocks: the bf16 copies autocast makes of fp32 trainable weights (LoRA's
                 A and B: 2 bytes per trained parameter; with grad checkpointing they are remade per
                 block in the backward, so not counted), and for QLoRA the bf16 copy of the fp32 head
                 (2 V h), which the head's matmul saves for the backward. Full and freeze with bf16
                 weights: autocast changes nothing (everything is bf16 already). Not modeled: fp32
                 weights under autocast (Trainer's fp32 master weights for full fine-tuning), fp16.
                 Measured on an H200 (benchmarks/gpu/memory_ledger.json, 1B Llama shape): every autocast
                 row within 0.3% of torch.cuda.max_memory_allocated, and transformers.Trainer (bf16=True)
                 allocating the same peak as gpu_lab.measure's loop.
                 CPU autocast (torch.autocast("cpu")) casts the same ops; what differs on a CPU is the
                 SDPA kernel (CPU flash, which keeps the same tensors) and PEFT's 4-bit LoRA layer: it
                 skips its fp32 input cast when torch.is_autocast_enabled() (CUDA's autocast) is on, so on
                 a CPU o's adapter casts the bf16 attention output to fp32 and autocast back to bf16, a
                 copy of 2 h_q bytes per token and block that CUDA does not make (QLoRA: -1.6% on the
                 CPU, tests/test_gpu_lab.py).
method="inference" (a prefill of batch x seq tokens with a KV cache) counts the weights, the KV cache
(2 L h_kv a per token), a block's working set a(2h + 3m) per token and the last position's logits;
a rough guide, not checked against a measurement.

Per GPU, with FSDP (`n_gpus=N, sharding="full"`, PyTorch's fully_shard, one unit per block and one for the
rest): every rank computes on its own batch_size x seq_len tokens, so activations, logits and workspace
are those of one GPU, undivided. What FSDP shards (every parameter, split along its first dimension) is
divided by N:
    weights      ceil(P / N) + Q      P: the parameters' bytes (4-bit codes packed in a float storage dtype
                                      included); Q: the 4-bit formats' block scales and double-quantization
                                      scales, which live in bitsandbytes' quant_state beside the parameter,
                                      not in it, so every rank keeps all of them (NF4 + DQ: 0.127 of 4.127
                                      bits per weight)
    gradients    ceil(G / N)          reduce-scattered: each rank keeps the gradient of its shard
    optimizer    ceil(S / N) + 4 t    the states of its shard; AdamW's step counters (t tensors) are not sharded
    gathered     R + 2 B              the unsharded parameters FSDP all-gathers for compute: the root unit
                                      (embeddings, final norm, head: R bytes, kept from the forward to the
                                      backward) and two blocks (B bytes each: the one computing and the one
                                      prefetched). Counted at N = 1 too: the all-gather output is a copy.
    total        weights + optimizer + gathered + max(activations + max(logits, workspace), gradients)
cpu_offload=True (FSDP's CPUOffloadPolicy) keeps the sharded parameters, their gradients and the optimizer
(whose step then runs on the CPU) in CPU memory: they move from weights, gradients and optimizer to
`offloaded` (CPU bytes per rank, not in total); the quant_state scales Q and the gathered units stay on
the GPU. sharding="none" is one GPU's ledger on every rank (DDP; its gradient buckets are not counted).
Not counted: NCCL's buffers and the CUDA context; FSDP's reduce-scatter buffers (a block's unsharded
gradients, small for LoRA).

"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from .bits import FLOAT_BITS, bits_per_param
from .shapes import Shape, shape_of

__all__ = ["ATTENTION", "LORA_TARGETS", "METHODS", "OPTIMIZERS", "SHARDING", "Ledger", "estimate"]

METHODS = ("full", "freeze", "lora", "qlora", "inference")
ATTENTION = ("fused", "math")
OPTIMIZERS = ("adamw", "adamw_32bit", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARDING = ("none", "full")


@dataclass
class Ledger:
    """Bytes of one training step (or forward pass) by term; `total` is the peak (see the module doc)."""

    method: str
    batch_size: int
    seq_len: int
    params: int  # parameters of the base model
    trainable: int  # parameters the optimizer updates
    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved for the backward pass (with grad checkpointing: the block inputs)
    logits: int  # the loss's fp32 buffers at the start of the backward pass
    workspace: int = 0  # backward pass of one block: gradient buffers (+ its recomputed activations)
    notes: tuple[str, ...] = field(default_factory=tuple)
    n_gpus: int = 1  # the ledger is per GPU (rank)
    sharding: str = "none"  # "full": FSDP shards weights, gradients and optimizer states over n_gpus
    cpu_offload: bool = False  # FSDP keeps the sharded parameters, gradients and optimizer on the CPU
    gathered: int = 0  # FSDP's unsharded units at the peak: the root unit and two blocks
    offloaded: int = 0  # CPU memory per rank with cpu_offload (not in total)

    TERMS: ClassVar[tuple[str, ...]] = ("weights", "gradients", "optimizer", "gathered", "activations", "logits",
                                        "workspace")
    COLORS: ClassVar[dict[str, str]] = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer": "#55a868",
                                        "gathered": "#64b5cd", "activations": "#c44e52", "logits": "#8172b3",
                                        "workspace": "#937860"}

    @property
    def gradients_at_peak(self) -> bool:
        """True when the peak is at the end of the backward pass (gradients, no activations)."""
        return self.gradients > self.activations + max(self.logits, self.workspace)

    @property
    def total(self) -> int:
        """weights + optimizer + gathered + max(activations + max(logits, workspace), gradients)."""
        return self.weights + self.optimizer + self.gathered + max(
            self.activations + max(self.logits, self.workspace), self.gradients)

    def at_peak(self) -> dict[str, int]:
        """The terms alive at the peak moment (they sum to `total`)."""
        fixed = {"weights": self.weights, "optimizer": self.optimizer}
        if self.sharding == "full":
            fixed["gathered"] = self.gathered
        if self.gradients_at_peak:
            return fixed | {"gradients": self.gradients}
        busy = "logits" if self.logits >= self.workspace else "workspace"
        return fixed | {"activations": self.activations, busy: getattr(self, busy)}

    def as_dict(self) -> dict:
        return asdict(self) | {"total": self.total}

    def __str__(self) -> str:
        unit, div = ("GB", 1e9) if self.total >= 1e9 else ("MB", 1e6)
        peak = self.at_peak()
        per_gpu = "" if self.sharding == "none" and self.n_gpus == 1 else (
            f", per GPU of {self.n_gpus} ({'FSDP full sharding' if self.sharding == 'full' else 'no sharding'}"
            f"{', CPU offload' if self.cpu_offload else ''})")
        rows = [(f"{self.method}: {self.params / 1e6:,.1f}M params ({self.trainable / 1e6:,.2f}M trained), "
                f"batch {self.batch_size} x seq {self.seq_len}{per_gpu}")]
        for term in self.TERMS:
            if term == "gathered" and self.sharding == "none":
                continue
            value = getattr(self, term)
            absent = "" if term in peak else "   (not at the peak)"
            rows.append(f"  {term:<12}{value / div:10.3f} {unit}{absent}")
        rows.append(f"  {'total (peak)':<12}{self.total / div:10.3f} {unit} = " + " + ".join(peak))
        if self.cpu_offload:
            rows.append(f"  {'CPU memory':<12}{self.offloaded / div:10.3f} {unit}   (offloaded, not in the total)")
        return "\n".join(rows + [f"  note: {n}" for n in self.notes])

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))

    def plot(self, ax=None, x: float = 0.0, label: str | None = None, unit: str = "GB"):
        """A stacked bar (at position `x`) of the terms alive at the peak; returns the axis."""
        import matplotlib.pyplot as plt

        div = {"GB": 1e9, "MB": 1e6}[unit]
        if ax is None:
            _, ax = plt.subplots(figsize=(4, 4))
            ax.set_title(f"{self.method}: peak {self.total / div:.2f} {unit}")
        bottom, seen = 0.0, set(ax.get_legend_handles_labels()[1])
        for term, value in self.at_peak().items():
            ax.bar(x, value / div, bottom=bottom, color=self.COLORS[term], width=0.6,
                   label=None if term in seen else term)
            seen.add(term)
            bottom += value / div
        ticks = getattr(ax, "_qlearn_ticks", {})  # bars drawn on this axis before, by position
        ticks[x] = label or self.method
        ax._qlearn_ticks = ticks
        ax.set_xticks(list(ticks), list(ticks.values()))
        ax.set_ylabel(f"memory at the peak ({unit})")
        ax.legend(loc="upper left", fontsize=8)
        return ax


def _check_int(name: str, value, low: int = 1, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > (high or value):
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")


def _block_bytes(s: Shape, a: int, lora_r: int | None, seq_len: int, attention: str = "fused",
                 autocast: bool = False) -> int:
    """Bytes saved for the backward pass per token by one block (formulas in the module docstring)."""
    h, hq, hkv, m = s.hidden, s.q_width, s.kv_width, s.intermediate
    if autocast and lora_r is not None:  # bf16 matmuls; a = 4: QLoRA's fp32 residual stream
        attn = 2 * (2 * hq + 2 * hkv) + 4 * s.heads  # bf16 q, output, k, v; fp32 logsumexp
        if a == 4:
            return 8 * h + attn + 12 * m + 2 * (5 * h + m) + 14 * lora_r
        return 8 * h + attn + 6 * m + 2 * (5 * h + hq + m) + 14 * lora_r
    if attention == "fused":  # rotated q and the attention output, k and v, logsumexp
        attn = 2 * a * hq + 2 * a * hkv + 4 * s.heads
    else:  # math kernel: the output, probabilities, scaled q and k and v repeated to n heads
        attn = a * hq + a * s.heads * seq_len + 3 * a * hq
    attention_and_mlp = attn + 3 * a * m  # + gate (SiLU input), SiLU output, up
    if lora_r is None:  # trained norms (fp32 input + normalized) and linear layers (their inputs)
        return 2 * (4 * h + a * h) + 2 * a * h + a * m + attention_and_mlp
    adapter_inputs = 4 * (5 * h + hq + m) if a != 4 else a * (2 * h + m)  # fp32 casts, or shared tensors
    return 2 * 4 * h + attention_and_mlp + adapter_inputs + 7 * 4 * lora_r


def _optimizer_bytes(optimizer: str, tensors: list[tuple[int, int]], mixed_precision: bool) -> int:
    """Optimizer state bytes for trainable tensors given as (numel, bytes per element)."""
    total = 0
    for n, b in tensors:
        if optimizer == "adamw":  # torch: exp_avg, exp_avg_sq like the parameter, a fp32 step counter
            total += (12 * n if mixed_precision else 2 * b * n) + 4
        elif optimizer.endswith("32bit") or n < 4096:  # bitsandbytes keeps small tensors in 32 bits
            total += 8 * n
        else:  # two uint8 states + an fp32 absmax per block of 256
            total += 2 * (n + 4 * math.ceil(n / 256))
    return total


def estimate(model_or_config, method: str, *, batch_size: int, seq_len: int, optimizer: str = "adamw",
             weight_format: str | None = None, lora_r: int | None = None, grad_checkpointing: bool = False,
             mixed_precision: bool = False, double_quant: bool = True,
             trainable_layers: int | None = None, attention: str = "fused", prepare_kbit: bool = True,
             n_gpus: int = 1, sharding: str = "none", cpu_offload: bool = False, autocast: bool = False) -> Ledger:
    """The memory ledger of one training step (or a forward pass) of a Llama-shaped model.

    model_or_config   a name in LLAMA_SHAPES ("llama-7b", ..., "tiny"), a transformers config or a model
    method            "full", "freeze" (the last `trainable_layers` blocks, default L // 4, the final
                      norm and the head), "lora", "qlora" (LoRA on all 7 linear layers of every block,
                      rank `lora_r`, default 16) or "inference"
    weight_format     "bf16" (default), "fp16" or "fp32"; for "qlora" "nf4" (default), "fp4" or "int8"
                      (bitsandbytes' LLM.int8); for "inference" also any format of bits_per_param. 4-bit formats use blocks of 64
                      and, unless double_quant=False, double quantization (QLoRA's recipe).
    optimizer         one of OPTIMIZERS; mixed_precision=True adds fp32 master weights (16-bit "full"
                      or "freeze" with "adamw")
    attention         "fused" (default) or "math" (the SDPA kernel CUDA runs for fp32 + grouped-query
                      attention; fp32 activations only: method "qlora" or weight_format "fp32")
    prepare_kbit      "qlora" only: True (default) models peft.prepare_model_for_kbit_training (fp32
                      embeddings, norms and head, fp32 residual stream); False keeps them and the
                      activations in bf16, FSDP-QLoRA's recipe (bnb_4bit_quant_storage=bf16; TRL skips the
                      prepare step when the 4-bit weights are to be sharded)
    autocast          True: the forward under bf16 autocast (Trainer/TRL with bf16=True; module docstring):
                      methods "full"/"freeze" with bf16 weights, "lora", "qlora" with prepare_kbit=True
    n_gpus, sharding  the ledger of one of n_gpus ranks: sharding "none" (each holds everything) or "full"
                      (FSDP: module docstring); cpu_offload=True (sharding "full" only) moves the shards to the CPU
    """
    s = shape_of(model_or_config)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_int("batch_size", batch_size)
    _check_int("seq_len", seq_len)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    fmt = (weight_format or ("nf4" if method == "qlora" else "bf16"))
    fmt = fmt.lower() if isinstance(fmt, str) else fmt
    bits_per_param(fmt)  # validates the name
    float_fmt = fmt in ("fp32", "fp16", "bf16")
    if method in ("full", "freeze", "lora") and not float_fmt:
        raise ValueError(f"weight_format for method={method!r} must be 'bf16', 'fp16' or 'fp32' (a quantized "
                         f"base is method='qlora'), got {weight_format!r}")
    if method == "qlora" and fmt not in ("nf4", "fp4", "int8", "llm.int8"):
        raise ValueError(f"weight_format for method='qlora' must be 'nf4', 'fp4' or 'int8', "
                         f"got {weight_format!r}")
    if method in ("lora", "qlora"):
        lora_r = 16 if lora_r is None else lora_r
        _check_int("lora_r", lora_r)
    elif lora_r is not None:
        raise ValueError(f"lora_r is for method='lora' or 'qlora', not {method!r}")
    if method == "freeze":
        trainable_layers = max(1, s.layers // 4) if trainable_layers is None else trainable_layers
        _check_int("trainable_layers", trainable_layers, 1, s.layers)
    elif trainable_layers is not None:
        raise ValueError(f"trainable_layers is for method='freeze', not {method!r}")
    if mixed_precision and (method not in ("full", "freeze") or fmt not in ("bf16", "fp16")
                            or optimizer != "adamw"):
        raise ValueError("mixed_precision=True (fp32 master weights) needs method 'full' or 'freeze', "
                         "weight_format 'bf16' or 'fp16' and optimizer 'adamw'")
    if method == "inference" and grad_checkpointing:
        raise ValueError("grad_checkpointing is for training methods, not 'inference'")
    if not isinstance(prepare_kbit, bool) or (not prepare_kbit and method != "qlora"):
        raise ValueError(f"prepare_kbit must be True or False, and False only for method='qlora', got {prepare_kbit!r}")
    _check_int("n_gpus", n_gpus)
    if sharding not in SHARDING:
        raise ValueError(f"sharding must be one of {SHARDING}, got {sharding!r}")
    if not isinstance(cpu_offload, bool) or (cpu_offload and sharding != "full"):
        raise ValueError(f"cpu_offload must be True or False, and True needs sharding='full' (it is FSDP's "
                         f"CPUOffloadPolicy), got cpu_offload={cpu_offload!r} with sharding={sharding!r}")
    if sharding == "full" and (method == "inference" or fmt in ("int8", "llm.int8")):
        raise ValueError("sharding='full' models FSDP training with float weights or 4-bit weights in a float "
                         "storage dtype (nf4, fp4); LLM.int8 weights are int8, which FSDP does not shard, and "
                         f"'inference' is not training: got method={method!r}, weight_format={fmt!r}")

    if not isinstance(autocast, bool):
        raise ValueError(f"autocast must be True or False, got {autocast!r}")
    if autocast and (method == "inference" or (method in ("full", "freeze") and fmt != "bf16")
                     or (method == "qlora" and not prepare_kbit)):
        raise ValueError("autocast=True is modeled for 'full'/'freeze' with weight_format 'bf16', 'lora', and "
                         f"'qlora' with prepare_kbit=True; got method={method!r}, weight_format={fmt!r}, "
                         f"prepare_kbit={prepare_kbit!r}")
    if autocast and attention == "math":
        raise ValueError("attention='math' with autocast=True: under bf16 autocast q, k and v are bf16 and a "
                         "fused kernel runs on a GPU: use attention='fused'")

    tokens = batch_size * seq_len
    h, L, V = s.hidden, s.layers, s.vocab
    rest = 4 if method == "qlora" and prepare_kbit else 2  # bytes of a non-quantized weight of a 4/8-bit model
    a = 4 if fmt == "fp32" or (method == "qlora" and prepare_kbit) else 2  # bytes of an activation
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if attention == "math" and (a != 4 or method == "inference"):
        raise ValueError("attention='math' is modeled for training with fp32 activations (method='qlora', "
                         "or weight_format='fp32'); 16-bit activations get a fused kernel on a GPU: "
                         "use attention='fused'")
    notes = []

    # Step 1: weights (4-bit/8-bit: block linear layers only, the rest 16-bit, or fp32 after QLoRA's prepare)
    lora = [] if lora_r is None else [(lora_r * n_in, 4) for _, n_in, _ in s.linears()] * L + \
        [(n_out * lora_r, 4) for _, _, n_out in s.linears()] * L
    block_params = sum(s.block_tensors())
    if float_fmt:
        weights = s.params * FLOAT_BITS[fmt] // 8
        scales = 0  # bytes outside the parameters (quant_state)
        block = block_params * FLOAT_BITS[fmt] // 8
        root = (s.params - L * block_params) * FLOAT_BITS[fmt] // 8
    else:
        qfmt = "llm.int8" if fmt == "int8" else fmt  # bitsandbytes' 8-bit loading: an fp32 scale per row
        row = [(n_in * n_out, n_in) for _, n_in, n_out in s.linears()]
        quant_bits = L * sum(n * bits_per_param(qfmt, 64, double_quant, row_length=r) for n, r in row)
        weights = math.ceil(quant_bits / 8) + (s.params - s.linear_params) * rest
        scales = math.ceil(quant_bits / 8) - s.linear_params // 2  # 4-bit: what is not the packed codes
        block = (block_params - 2 * s.hidden) // 2 + 2 * s.hidden * rest
        root = (s.params - L * block_params) * rest
    weights += sum(n * b for n, b in lora)
    block += sum(n * b for n, b in lora) // L

    # Step 2: what the optimizer updates, and the gradients
    wb = FLOAT_BITS[fmt] // 8 if float_fmt else 2
    if method == "full":
        trained = [(n, wb) for n in s.tensors()]
    elif method == "freeze":
        head = [s.vocab * h]  # the head, or the embedding it shares
        trained = [(n, wb) for n in s.block_tensors() * trainable_layers + [h] + head]
    else:
        trained = lora
    gradients = sum(n * b for n, b in trained)

    # Step 3: optimizer states (of each rank's shard of every trained tensor under full sharding)
    shards = [(math.ceil(n / n_gpus), b) for n, b in trained] if sharding == "full" else trained
    optimizer_bytes = _optimizer_bytes(optimizer, shards, mixed_precision) if trained else 0
    if optimizer.startswith("paged") and trained:
        notes.append("paged optimizer states live in CUDA unified memory: "
                     "not in torch.cuda.max_memory_allocated")

    # Step 4: activations, the loss buffers and the backward working set of one block
    workspace = 0
    if method == "inference":
        kv_cache = 2 * L * s.kv_width * a
        activations = (kv_cache + a * (2 * h + 3 * s.intermediate)) * tokens
        logits = 6 * V * batch_size  # the last position's logits, bf16 and fp32
        notes.append("inference: KV cache + one block's working set + last-position logits (rough)")
    else:
        m = s.intermediate
        trained_blocks = trainable_layers if method == "freeze" else L
        per_block = _block_bytes(s, a, lora_r, seq_len, attention, autocast)
        head = 4 * h + (2 * a * h if method in ("full", "freeze") else 0)  # final norm (+ head input)
        # gradient buffers of the block being differentiated: 16-bit (or fp32) MLP- and model-width
        # gradients, and for LoRA the fp32 gradient of the adapters' MLP-width input
        workspace = (a * (2 * m + 2 * h) if lora_r is None else 2 * (2 * m + 2 * h) + 4 * m) * tokens
        if grad_checkpointing:
            saved = trained_blocks * a * h + head
            workspace += (per_block + 2 * a * h) * tokens  # the recomputed block, its output and gradient
        else:
            first_norm = 0 if method == "full" else 4 * h  # its input needs no gradient
            saved = trained_blocks * per_block - first_norm + head
        activations = saved * tokens
        if autocast and lora_r is not None:  # autocast's bf16 copies of fp32 weights that matmuls save
            copies = 0 if grad_checkpointing else 2 * sum(n for n, _ in trained)
            copies += 2 * V * h if method == "qlora" else 0  # the fp32 head (prepare_kbit), cast for its matmul
            activations += copies
        logits = 12 * V * tokens

    # Step 5: per rank under FSDP: shards of the parameters and gradients, the unsharded units it gathers
    gathered = offloaded = 0
    if sharding == "full":
        weights = math.ceil((weights - scales) / n_gpus) + scales
        gradients = sum(n * b for n, b in shards)
        gathered = root + 2 * block
        if scales:
            notes.append(f"the 4-bit scales ({scales / 1e6:,.1f} MB) are in bitsandbytes' quant_state, not in "
                         "the parameters FSDP shards: every rank holds all of them")
        if cpu_offload:
            offloaded = weights - scales + gradients + optimizer_bytes
            weights, gradients, optimizer_bytes = scales, 0, 0
    return Ledger(method, batch_size, seq_len, s.params, sum(n for n, _ in trained), weights, gradients,
                  optimizer_bytes, activations, logits, workspace, tuple(notes), n_gpus, sharding, cpu_offload,
                  gathered, offloaded)

