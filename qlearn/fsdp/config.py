"""What one FSDP run is (`FSDPConfig`), and every check that can refuse it before a process starts.

The refusals are the known failure modes of FSDP + (Q)LoRA, each with its reason:
    nproc < 1, or more processes than visible GPUs (one process per GPU: NCCL does not share a GPU)
    a missing distributed backend (gloo on the CPU, NCCL on CUDA GPUs)
    quant_storage != the model's dtype (the 4-bit weights would not be sharded; see QUANT_STORAGE_WHY)
    trainable parameters of two dtypes in one FSDP unit (see MIXED_DTYPES_WHY; checked on the built model
    by qlearn.fsdp.model.check_unit_dtypes, since a config cannot see every parameter)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["ADAPTER_DTYPES", "DEVICES", "METHODS", "MIXED_DTYPES_WHY", "QUANT_STORAGE_WHY", "SHAPES", "STORAGE",
           "FSDPConfig", "check_backend", "resolve_dtype"]

DEVICES = ("cpu", "cuda")
METHODS = ("lora", "qlora")
ADAPTER_DTYPES = ("float32", "model")
STORAGE = ("uint8", "bfloat16", "float16", "float32")
# "tiny" is the embedded model (data/tiny, pretrained); the others are Llama shapes with random N(0, 0.02)
# weights (LlamaConfig fields). llama-1b: Llama 3.2 1B; llama-8b: Llama 3.1 8B; llama-2-70b: the PEFT docs' model.
SHAPES = {
    "tiny": None,
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0},
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0},
    "llama-2-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False},
}

QUANT_STORAGE_WHY = (
    "FSDP shards a parameter only as a float tensor of the dtype its unit all-gathers in. With uint8 "
    "storage (bitsandbytes' default) the 4-bit weights cannot be sharded: FSDP1 refuses integer parameters, "
    "and accelerate's FSDP2 path puts them in ignored_params, so every rank keeps all of them and the run "
    "only warns (accelerate#3983; before that fix the same run trained on loss 0.0 with NaN gradients). "
    "With another float dtype the packed bytes sit in a unit of the model's dtype: FSDP1 cannot flatten the "
    "two dtypes together, and a mixed-precision policy would cast the packed bytes as if they were numbers. "
    "Set bnb_4bit_quant_storage (here quant_storage) to the model's dtype, as the PEFT and bitsandbytes docs do.")
MIXED_DTYPES_WHY = (
    "FSDP reduces the gradients of one unit together, so its trainable parameters must share a dtype: FSDP2 "
    "raises 'FSDP expects uniform original parameter dtype' and FSDP1 'Must flatten tensors with uniform "
    "dtype'. Keep every adapter in one dtype (PEFT's default casts them all to float32; frozen weights of "
    "another dtype are fine under FSDP2, which all-gathers mixed dtypes as bytes).")


@dataclass(frozen=True)
class FSDPConfig:
    """One sharded fine-tuning run; the single-process reference run uses the same fields."""

    nproc: int = 2  # processes (ranks), one per GPU on CUDA
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (NCCL)
    method: str = "lora"  # "lora" (16/32-bit base) or "qlora" (bitsandbytes NF4 base)
    shape: str = "tiny"  # a key of SHAPES
    steps: int = 3
    batch_size: int = 2  # sequences per rank and step; the global batch is nproc x batch_size
    seq_len: int = 64
    lora_r: int = 8
    lora_alpha: int = 16
    lr: float = 1e-3
    dtype: str | None = None  # the model's dtype; None: float32 on the CPU (no fast bf16 there), bfloat16 on CUDA
    quant_storage: str | None = None  # qlora: bnb_4bit_quant_storage; None: the model's dtype
    adapter_dtype: str = "float32"  # LoRA's A and B: "float32" (PEFT's default) or "model" (the base's dtype)
    replicate_incompatible: bool = False  # run a refused quant_storage anyway, the way accelerate does (demo)
    grad_checkpointing: bool = False
    cpu_offload: bool = False  # FSDP2's CPUOffloadPolicy (CUDA only)
    reference: bool = True  # also run the single-process reference
    save_adapter: str | None = None  # a folder: the trained adapter, gathered, in PEFT's format
    seed: int = 0

    def __post_init__(self):
        self.validate()

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.device)

    @property
    def storage_dtype(self) -> torch.dtype:
        return getattr(torch, self.quant_storage) if self.quant_storage else self.torch_dtype

    def validate(self) -> None:
        """Raise ValueError naming the field and what is allowed (the module docstring lists why)."""
        for name in ("nproc", "steps", "batch_size", "seq_len", "lora_r", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "seq_len" else 1):
                raise ValueError(f"{name} must be an int >= {2 if name == 'seq_len' else 1}, got {value!r}")
        for name, allowed in (("device", DEVICES), ("method", METHODS), ("shape", tuple(SHAPES)),
                              ("adapter_dtype", ADAPTER_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        resolve_dtype(self.dtype, self.device)
        if self.quant_storage is not None and self.quant_storage not in STORAGE:
            raise ValueError(f"quant_storage must be None (the model's dtype) or one of {STORAGE}, got {self.quant_storage!r}")
        if self.quant_storage is not None and self.method != "qlora":
            raise ValueError("quant_storage is for method='qlora' (the dtype bitsandbytes packs 4-bit codes in)")
        if self.storage_dtype != self.torch_dtype and not self.replicate_incompatible:
            raise ValueError(f"quant_storage={self.quant_storage!r} differs from the model's dtype "
                             f"{str(self.torch_dtype).removeprefix('torch.')}: {QUANT_STORAGE_WHY}")
        if self.device == "cpu" and self.cpu_offload:
            raise ValueError("cpu_offload=True moves the shards from the GPU to the CPU: it needs device='cuda'")
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device='cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False): "
                                 "use device='cpu' (gloo), or a CUDA build of torch on a machine with a GPU")
            if self.nproc > torch.cuda.device_count():
                raise ValueError(f"nproc={self.nproc} but {torch.cuda.device_count()} CUDA GPU(s) are visible: FSDP "
                                 "runs one process per GPU (NCCL does not share one GPU between ranks); lower "
                                 "nproc or check CUDA_VISIBLE_DEVICES")

    def as_dict(self) -> dict:
        return asdict(self) | {"dtype": str(self.torch_dtype).removeprefix("torch."),
                               "quant_storage": (str(self.storage_dtype).removeprefix("torch.")
                                                 if self.method == "qlora" else None)}


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """The model's dtype: `dtype` by name, or float32 on the CPU and bfloat16 on CUDA."""
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be None, 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return getattr(torch, dtype)


def check_backend(device: str) -> str:
    """The process-group backend for `device` ("gloo" or "nccl"); RuntimeError if this torch lacks it."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed (torch.distributed.is_available() is False): "
                           "install a standard PyTorch wheel")
    backend = "gloo" if device == "cpu" else "nccl"
    if not (dist.is_gloo_available() if backend == "gloo" else dist.is_nccl_available()):
        raise RuntimeError(f"the {backend!r} distributed backend is missing from this torch build "
                           f"(torch.distributed.is_{backend}_available() is False); device={device!r} needs it: "
                           + ("NCCL ships with Linux CUDA wheels only" if backend == "nccl" else
                              "gloo ships with every standard wheel"))
    return backend
