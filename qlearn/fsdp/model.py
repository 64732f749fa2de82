"""The model one rank trains: a Llama (the embedded one, or a shape with random weights), LoRA adapters
from PEFT, and FSDP2's sharding of it (`torch.distributed.fsdp.fully_shard`).

    build(config, device)          the base model (bitsandbytes NF4 for "qlora") with PEFT LoRA on all 7
                                   linear layers of every block; the same weights on every rank and in
                                   the single-process reference (seeded, built in the same order)
    shard(model, config, mesh)     one FSDP unit per decoder block and one root unit (embeddings, final norm,
                                   head): PyTorch's and accelerate's usual wrapping. No MixedPrecisionPolicy:
                                   each parameter is all-gathered in its own dtype, so packed 4-bit bytes
                                   are never cast (QUANT_STORAGE_WHY).
    check_unit_dtypes(units)       one dtype for the trainable parameters of each unit (MIXED_DTYPES_WHY)
    packed_weights(model)          the bitsandbytes Linear4bit layers, by name
    nan_patterns(data, dtype)      how many elements of packed bytes, viewed as `dtype`, are NaN bit patterns
                                   (bitsandbytes#1945: bf16 has 2 x 127 of them, exponent 0xFF and a non-zero
                                   mantissa; a NaN-canonicalizing copy rewrites them all to one pattern)
"""

from __future__ import annotations

import torch
from torch import nn

from ..memory import LORA_TARGETS
from ..paths import data_dir
from .config import MIXED_DTYPES_WHY, SHAPES, FSDPConfig

__all__ = ["build", "check_unit_dtypes", "decoder_layers", "nan_patterns", "packed_weights", "shard"]


def _bnb_config(config: FSDPConfig):
    from transformers import BitsAndBytesConfig

    # QLoRA's recipe, every setting explicit (BitsAndBytesConfig's defaults are fp4, no double quantization)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=config.torch_dtype, bnb_4bit_quant_storage=config.storage_dtype)


def _random_llama(config: FSDPConfig, device: torch.device, seed: int) -> nn.Module:
    """A Llama of SHAPES[config.shape] with N(0, 0.02) weights (norms 1), built on the meta device and filled
    module by module on `device`; for "qlora" each linear's 16-bit weight is made and quantized at once (as
    a loader streams a checkpoint), so at most one 16-bit matrix exists at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**SHAPES[config.shape], max_position_embeddings=max(2048, config.seq_len))
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = config.torch_dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    for module in model.modules():  # the same order on every rank: the same weights
        if isinstance(module, nn.Linear) and config.method == "qlora" and module is not model.lm_head:
            continue  # quantized below
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            for name, p in module.named_parameters(recurse=False):
                p.data.fill_(1.0) if "norm" in type(module).__name__.lower() else p.data.normal_(0.0, 0.02, generator=gen)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(device)  # its inv_freq buffer was on meta
    if config.method == "qlora":
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for child, old in list(parent.named_children()):
                    if not isinstance(old, nn.Linear):
                        continue
                    w = torch.empty(old.out_features, old.in_features, dtype=dtype, device=device)
                    w.normal_(0.0, 0.02, generator=gen)
                    new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=dtype,
                                            compress_statistics=True, quant_type="nf4",
                                            quant_storage=config.storage_dtype, device="meta")
                    new.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                                   blocksize=64, quant_storage=config.storage_dtype,
                                                   module=new).to(device)  # quantized here
                    del w
                    setattr(parent, child, new)
        model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT reads it
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        raise RuntimeError("a parameter or buffer was left on the meta device")
    return model


def build(config: FSDPConfig, device: torch.device) -> nn.Module:
    """The base model with PEFT LoRA (r, alpha from `config`, no dropout) on every block linear layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # Step 1: the base, the same on every rank
    if config.shape == "tiny":
        kwargs = {"dtype": config.torch_dtype}
        if config.method == "qlora":
            index = device.index or 0
            kwargs |= {"quantization_config": _bnb_config(config),
                       "device_map": {"": index if device.type == "cuda" else "cpu"}}
        model = AutoModelForCausalLM.from_pretrained(data_dir() / "tiny", **kwargs)
        if config.method == "qlora" and device.type == "cpu":
            from ..models import keep_standard_layout

            keep_standard_layout(model)  # bitsandbytes' CPU repacking breaks the gradient path (qlearn.models)
        if config.method == "lora":  # a 4-bit model is loaded onto its device (device_map)
            model.to(device)
    else:
        model = _random_llama(config, device, config.seed)
    model.config.use_cache = False
    if config.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # Step 2: LoRA. A is random (kaiming-uniform from torch's global generator: seeded, so equal on every rank),
    # B = 0. PEFT casts 16-bit adapters to float32 unless adapter_dtype="model".
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=list(LORA_TARGETS))
    model = get_peft_model(model, lora, autocast_adapter_dtype=config.adapter_dtype == "float32")
    model.train()
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a (PEFT-wrapped) Llama: one FSDP unit each."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


def check_unit_dtypes(units: list[nn.Module]) -> None:
    """ValueError if the trainable parameters a unit owns (those of no later unit inside it) mix dtypes."""
    owned: set[int] = set()
    for unit in units:  # innermost first, as fully_shard is applied
        dtypes: dict[torch.dtype, str] = {}
        for name, p in unit.named_parameters():
            if id(p) in owned:
                continue
            owned.add(id(p))
            if p.requires_grad:
                dtypes.setdefault(p.dtype, name)
        if len(dtypes) > 1:
            found = ", ".join(f"{str(d).removeprefix('torch.')} ({n})" for d, n in dtypes.items())
            raise ValueError(f"one FSDP unit ({type(unit).__name__}) trains parameters of {len(dtypes)} dtypes: "
                             f"{found}. {MIXED_DTYPES_WHY}")


def packed_weights(model: nn.Module) -> dict[str, nn.Module]:
    """bitsandbytes' Linear4bit layers by qualified name (the base layers under PEFT's LoRA wrappers)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def nan_patterns(data: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> int:
    """Elements of `data`'s bytes that, viewed as `dtype`, are NaN: the bytes a NaN-canonicalizing copy
    (e.g. torch._foreach_copy_ on CUDA, pytorch#159333) may rewrite."""
    raw = data.detach().contiguous().view(torch.uint8).flatten()
    return int(torch.isnan(raw.view(dtype)).sum())


def shard(model: nn.Module, config: FSDPConfig, mesh) -> dict[str, int]:
    """Apply fully_shard to every decoder block, then to the whole model; return what was left unsharded.

    With replicate_incompatible=True, integer-stored 4-bit weights go to `ignored_params`, as accelerate's
    fsdp2_prepare_model does since accelerate#3983: each rank keeps all of them."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    layers = decoder_layers(model)
    check_unit_dtypes([*layers, model])
    kwargs = {"mesh": mesh, "reshard_after_forward": True}
    if config.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    ignored = {m.weight for m in packed_weights(model).values() if not m.weight.is_floating_point()}
    if ignored and not config.replicate_incompatible:
        raise ValueError(f"{len(ignored)} 4-bit weights are stored as {next(iter(ignored)).dtype}, not a float")
    if ignored:
        kwargs["ignored_params"] = ignored
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return {"ignored_params": len(ignored)}
