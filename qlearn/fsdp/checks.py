"""The record of a sharded run and the checks it makes on itself.

    each_rank_holds_1_over_n     every parameter is sharded (none replicated) and rank r holds P / N bytes
                                 to within one row per parameter (torch.chunk gives the first ranks
                                 ceil(rows / N) rows): |P_r - P / N| <= sum_p bytes(row of p)
    losses_match_single_process  max_k |loss_k - reference_k| / |reference_k| <= LOSS_TOLERANCE[dtype] (measured)
    trainable_equal              every rank's model (and the reference) trains the same logical count
    loss_finite_nonzero          every loss is finite and not 0.0 (accelerate#3983 trained on loss 0.0)
    packed_bytes_unchanged       (QLoRA) no packed 4-bit byte differs from the quantized original, neither
                                 in the unsharded weights the forward pass used nor in the shards afterwards
                                 (bitsandbytes#1945: NaN patterns rewritten by FSDP2's copies)

LOSS_TOLERANCE, relative: a correct run keeps |loss_k - reference_k| <= rtol |reference_k|; only reduction
order separates them (the sharded run averages the loss over b sequences per rank and then over ranks, the
reference over all B; the gradient is reduce-scattered; each rank multiplies b rows where the reference
multiplies B, which can round differently). Measured with `python -m qlearn.fsdp` on the tiny model (the
largest |difference| / loss over all steps of every run):
    float32    1e-5   measured <= 3.4e-7 in 12 runs: LoRA and QLoRA, nproc 1, 2 and 4, seeds 0-2, 1 and 2
                      threads, ATEN_CPU_CAPABILITY=default and avx2, 3 and 8 steps (abs. <= 7.2e-7)
    bfloat16   1e-2   measured <= 7.5e-4 in 4 runs (LoRA with float32 or bf16 adapters, QLoRA, seeds 0-1; abs.
                      <= 2.1e-3): bf16 rounds every activation; measured on the CPU only, the GPU runs record theirs
    float16    5e-3   not measured (3 more mantissa bits than bf16)
"""

from __future__ import annotations

import math
from importlib.metadata import PackageNotFoundError, version

import torch

from ..env import cpu_name
from .config import SHAPES, FSDPConfig

__all__ = ["LOSS_TOLERANCE", "ledgers", "summarize"]

LOSS_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}  # relative (above)


def _versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return cpu_name()


def ledgers(config: FSDPConfig) -> tuple:
    """qlearn.memory.estimate for this run: (per rank under full sharding, one unsharded process)."""
    from transformers import LlamaConfig

    from ..memory import estimate

    shape = "tiny" if config.shape == "tiny" else LlamaConfig(**SHAPES[config.shape])
    fp32 = config.torch_dtype == torch.float32
    kwargs = {"batch_size": config.batch_size, "seq_len": config.seq_len, "lora_r": config.lora_r,
              "grad_checkpointing": config.grad_checkpointing}
    if config.method == "qlora":  # prepare_kbit=True is the ledger's fp32 non-quantized weights and activations
        kwargs |= {"weight_format": "nf4", "prepare_kbit": fp32}
    else:
        kwargs["weight_format"] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[config.torch_dtype]
    gqa = config.shape != "tiny" and SHAPES[config.shape]["num_key_value_heads"] < SHAPES[config.shape]["num_attention_heads"]
    kwargs["attention"] = "math" if config.device == "cuda" and fp32 and gqa else "fused"  # qlearn.gpu_lab.attention_kernel
    per_rank = estimate(shape, config.method, **kwargs, n_gpus=config.nproc, sharding="full",
                        cpu_offload=config.cpu_offload)
    single = estimate(shape, config.method, batch_size=config.nproc * config.batch_size,
                      **{k: v for k, v in kwargs.items() if k != "batch_size"})
    return per_rank, single


def summarize(config: FSDPConfig, ranks: list[dict], reference: dict | None, seconds: dict) -> dict:
    """The JSON record (module docstring of qlearn.fsdp) from the ranks' reports and the reference's."""
    n = config.nproc
    total = ranks[0]["param_bytes_total"]
    per_rank = [r["param_bytes"] for r in ranks]
    losses = ranks[0]["losses"]  # all-reduced: the same list on every rank
    tol = LOSS_TOLERANCE[config.torch_dtype]
    record = {
        "ranks": n, "device": config.device, "device_name": _device_name(config.device),
        "backend": "gloo" if config.device == "cpu" else "nccl", "config": config.as_dict(),
        "param_bytes_per_rank": per_rank, "param_bytes_total": total,
        "replicated_param_bytes_per_rank": [r["replicated_param_bytes"] for r in ranks],
        "quant_state_bytes_per_rank": [r["quant_state_bytes"] for r in ranks],
        "grad_bytes_per_rank": [r["grad_bytes"] for r in ranks],
        "optimizer_bytes_per_rank": [r["optimizer_bytes"] for r in ranks],
        "losses": losses,
        "single_process_losses": reference["losses"] if reference else None,
        "loss_rtol": tol,
        "trainable_per_rank": [r["trainable"] for r in ranks],
        "single_process_trainable": reference["trainable"] if reference else None,
        "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks] if config.device == "cuda" else None,
        "resident_bytes_per_rank": [r.get("resident_bytes") for r in ranks] if config.device == "cuda" else None,
        "single_process_peak_bytes": reference["peak_bytes"] if reference else None,
        "step_seconds_per_rank": [[round(t, 4) for t in r["step_seconds"]] for r in ranks],
        "single_process_step_seconds": [round(t, 4) for t in reference["step_seconds"]] if reference else None,
        "cpu_seconds_per_rank": [r.get("cpu_seconds") for r in ranks],
        "single_process_cpu_seconds": reference.get("cpu_seconds") if reference else None,
        "packed": None, "seconds": {k: round(v, 2) for k, v in seconds.items()}, "versions": _versions(),
    }
    if "packed" in ranks[0]:
        packed = {k: v for k, v in ranks[0]["packed"].items() if not k.startswith("changed") and k != "layers_seen"}
        packed["changed_in_forward_per_rank"] = [r["packed"]["changed_in_forward"] for r in ranks]
        packed["changed_in_shards_per_rank"] = [r["packed"]["changed_in_shards"] for r in ranks]
        packed["layers_seen_per_rank"] = [r["packed"]["layers_seen"] for r in ranks]
        record["packed"] = packed
    # the checks
    bound = ranks[0]["imbalance_bound_bytes"]
    checks = {
        "each_rank_holds_1_over_n": all(r == 0 for r in record["replicated_param_bytes_per_rank"])
        and sum(per_rank) == total and all(abs(b - total / n) <= bound for b in per_rank),
        "trainable_equal": len(set(record["trainable_per_rank"])) == 1
        and (reference is None or reference["trainable"] == record["trainable_per_rank"][0]),
        "loss_finite_nonzero": all(math.isfinite(v) and v != 0.0
                                   for v in losses + (reference["losses"] if reference else [])),
    }
    if reference:
        diff = max(abs(a - b) for a, b in zip(losses, reference["losses"]))
        rel = max(abs(a - b) / abs(b) if b else math.inf for a, b in zip(losses, reference["losses"]))
        record["max_loss_diff"], record["max_loss_rel_diff"] = diff, rel
        checks["losses_match_single_process"] = rel <= tol
    if record["packed"]:
        p = record["packed"]
        checks["packed_bytes_unchanged"] = (not any(p["changed_in_forward_per_rank"])
                                            and not any(p["changed_in_shards_per_rank"]))
    record["shard_fraction_per_rank"] = [round(b / total, 4) for b in per_rank]
    per_rank_ledger, single_ledger = ledgers(config)
    record["ledger_per_rank"] = per_rank_ledger.as_dict() | {"total": per_rank_ledger.total}
    record["ledger_single_process"] = single_ledger.as_dict() | {"total": single_ledger.total}
    if record["peak_bytes_per_rank"]:  # the ledger against torch.cuda.max_memory_allocated (qlearn.memory's 15% target)
        record["ledger_error_per_rank"] = [round(per_rank_ledger.total / b - 1, 4) for b in record["peak_bytes_per_rank"]]
    if reference and reference["peak_bytes"]:
        record["single_process_ledger_error"] = round(single_ledger.total / reference["peak_bytes"] - 1, 4)
    record["checks"] = checks
    record["ok"] = all(checks.values())
    return record
