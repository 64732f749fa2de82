"""Launching N ranks, training each on its slice of the global batch, and the single-process reference.

    run(config) -> dict      spawn config.nproc processes (torch.multiprocessing, start method "spawn";
                             rendezvous through a file, so no port is opened), each calling `train` with
                             sharded=True; then `train` once in this process with sharded=False on the
                             whole global batch; then `summarize` (qlearn.fsdp.checks) -> the JSON record
    save_adapter(model, dir) the trained LoRA weights gathered from the shards, in PEFT's format (to merge
                             in one process afterwards: PEFT cannot merge a sharded model)

One step k of rank r (N ranks, b sequences each, global batch B = N b of the course's validation text):

    loss_r   = mean over the b (T - 1) predicted tokens of x[k, r b : (r + 1) b]
    loss_k   = (1/N) sum_r loss_r          (an all-reduce: equal token counts, so the global batch's mean)
    g        = (1/N) sum_r grad loss_r     (FSDP's reduce-scatter: each rank gets its shard of it)
    theta_r  = AdamW(theta_r, g_r)         (each rank updates only its shard)

The reference computes loss_k and g on all B sequences at once: the same numbers up to float rounding,
whose size `checks.LOSS_TOLERANCE` states.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ..modules import count_trainable
from .config import FSDPConfig, check_backend
from .model import build, nan_patterns, packed_weights, shard

__all__ = ["global_batches", "run", "save_adapter", "train"]


def global_batches(config: FSDPConfig) -> torch.Tensor:
    """(steps, nproc x batch_size, seq_len) token ids: consecutive windows of data/val.txt (cycled), the
    same on every rank and in the reference. Its ids (< 8192) fit every shape's vocabulary."""
    from transformers import AutoTokenizer

    from ..evaluate import validation_text
    from ..paths import data_dir

    tok = AutoTokenizer.from_pretrained(data_dir() / "tiny")
    ids = torch.tensor(tok(validation_text(), add_special_tokens=False, verbose=False).input_ids)
    windows = ids[: len(ids) // config.seq_len * config.seq_len].view(-1, config.seq_len)  # (W, T)
    B = config.nproc * config.batch_size
    index = torch.arange(config.steps * B) % len(windows)
    return windows[index].view(config.steps, B, config.seq_len)  # (steps, B, T)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(tensors) -> int:
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def _quant_state_bytes(model: nn.Module) -> int:
    """Bytes of bitsandbytes' quant_state tensors (scales, nested scales, code books): beside, not in, the
    parameters, so FSDP leaves a full copy on every rank."""
    total = 0
    for layer in packed_weights(model).values():
        state = layer.quant_state if getattr(layer, "quant_state", None) is not None else layer.weight.quant_state
        for s in (state, getattr(state, "state2", None)):
            if s is not None:
                total += sum(t.numel() * t.element_size() for t in vars(s).values() if torch.is_tensor(t))
    return total


def _changed(now: torch.Tensor, before: torch.Tensor) -> int:
    """Bytes that differ (packed 4-bit data compared as raw bytes, on the CPU)."""
    return int((now.detach().contiguous().view(torch.uint8).flatten().cpu() != before).sum())


def save_adapter(model: nn.Module, folder: Path | None) -> None:
    """Gather each trainable (LoRA) tensor in full (every rank must call this: it is a collective) and, where
    `folder` is given, save them in PEFT's format (adapter_config.json + adapter_model.safetensors), which
    PeftModel.from_pretrained loads in one process (to merge: PEFT cannot merge a sharded model)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().contiguous()
            for n, p in model.named_parameters() if p.requires_grad}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        model.peft_config["default"].save_pretrained(str(folder))
        save_file(get_peft_model_state_dict(model, state_dict=full), str(folder / "adapter_model.safetensors"))


def train(config: FSDPConfig, device: torch.device, data: torch.Tensor, *, sharded: bool, rank: int = 0,
          adapter: Path | None = None) -> dict:
    """Build, (shard,) train config.steps steps on `data`, report bytes, losses and the packed-byte checks,
    and save the trained adapter to `adapter` (rank 0)."""
    import torch.distributed as dist

    world = config.nproc if sharded else 1
    cuda = device.type == "cuda"
    cpu = {"before_build": time.process_time()}  # this process's CPU seconds, phase by phase
    model = build(config, device)
    cpu["build"] = time.process_time() - cpu["before_build"]
    # No list of the parameters is kept: fully_shard replaces them, and a live reference would keep every
    # unsharded original in memory beside its shard (measured on an H200: 11.46 GB resident for 5.79 GB of weights).
    total = _nbytes(model.parameters())
    one_row = sum(p[0].numel() * p.element_size() for p in model.parameters() if p.dim() > 0)  # torch.chunk's bound
    # Step 1: the packed 4-bit bytes before FSDP touches them (a CPU copy), and their NaN patterns
    packed = {n: m.weight.data.contiguous().view(torch.uint8).flatten().cpu().clone()
              for n, m in packed_weights(model).items()} if sharded else {}
    raw = torch.cat(list(packed.values())) if packed else torch.empty(0, dtype=torch.uint8)
    storage = next(iter(packed_weights(model).values())).weight.dtype if packed else None
    out = {"param_bytes_total": total, "imbalance_bound_bytes": one_row}
    if packed:
        out["packed"] = {"bytes": raw.numel(), "elements_bf16": raw.numel() // 2, "nan_patterns_bf16": nan_patterns(raw),
                         "storage": str(storage).removeprefix("torch."),
                         "nan_patterns_storage": nan_patterns(raw, storage) if storage.is_floating_point else 0}
    # Step 2: shard; watch the unsharded 4-bit weights the first forward pass computes with
    seen: dict[str, int] = {}
    hooks = []
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        out |= shard(model, config, init_device_mesh(device.type, (world,)))
        for name, layer in packed_weights(model).items():
            def check(module, args, name=name):
                if name not in seen:
                    seen[name] = _changed(module.weight, packed[name])
            hooks.append(layer.register_forward_pre_hook(check))
    out["trainable"] = count_trainable(model)  # DTensor.numel() is the global count: the logical model
    out["param_bytes"] = _nbytes(model.parameters())
    out["replicated_param_bytes"] = _nbytes(p for p in model.parameters() if not hasattr(p, "to_local"))
    out["quant_state_bytes"] = _quant_state_bytes(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    if cuda:
        torch.cuda.synchronize(device)
        out["resident_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    # Step 3: train; rank r takes rows r b .. (r + 1) b of each global batch
    losses, seconds = [], []
    b = config.batch_size
    cpu["shard"] = time.process_time() - cpu["before_build"] - cpu["build"]
    for k in range(config.steps):
        x = (data[k, rank * b:(rank + 1) * b] if sharded else data[k]).to(device)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if k == config.steps - 1:
            out["grad_bytes"] = _nbytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().float().clone()
        if sharded:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= world
        losses.append(value.item())
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
    out |= {"losses": losses, "step_seconds": seconds,
            "optimizer_bytes": _nbytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))}
    out["peak_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else None
    save_adapter(model, adapter if rank == 0 else None)
    cpu["train"] = time.process_time() - cpu["before_build"] - cpu["build"] - cpu["shard"]
    out["cpu_seconds"] = {k: round(v, 2) for k, v in cpu.items()}
    # Step 4: did any packed byte change: in what the forward pass saw, and in this rank's shards now
    for h in hooks:
        h.remove()
    if packed and sharded:
        out["packed"]["changed_in_forward"] = sum(seen.values())
        out["packed"]["layers_seen"] = len(seen)
        changed = 0
        for name, layer in packed_weights(model).items():
            before = packed[name]
            if not hasattr(layer.weight, "to_local"):  # left whole (ignored_params)
                changed += _changed(layer.weight, before)
                continue
            rows = layer.weight.shape[0]
            size = -(-rows // world)  # torch.chunk: ceil(rows / N) rows per rank, the last ranks fewer
            per_row = before.numel() // rows
            start, stop = min(rank * size, rows) * per_row, min((rank + 1) * size, rows) * per_row
            changed += _changed(layer.weight.to_local(), before[start:stop])
        out["packed"]["changed_in_shards"] = changed
    return out


def _adapter_diff(a: Path, b: Path) -> float:
    """The largest |difference| between two saved adapters' tensors."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if x.keys() != y.keys():
        raise RuntimeError("the sharded and single-process adapters have different tensors")
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def _worker(rank: int, fields: dict, data: torch.Tensor, folder: str) -> None:
    """One rank: join the process group (gloo or NCCL), train its shard, write rank{r}.json."""
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    config = FSDPConfig(**fields)
    backend = check_backend(config.device)
    if config.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // config.nproc))  # the ranks share the cores
    dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=config.nproc, timeout=datetime.timedelta(minutes=10),
                            device_id=device if device.type == "cuda" else None)
    try:
        result = train(config, device, data, sharded=True, rank=rank, adapter=Path(folder, "adapter_sharded"))
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(config: FSDPConfig) -> dict:
    """The sharded run on config.nproc ranks, the reference in this process, and the checked record."""
    import warnings

    import torch.multiprocessing as mp

    from .checks import summarize

    check_backend(config.device)
    fields = {k: v for k, v in vars(config).items()}
    data = global_batches(config)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qlearn-fsdp-") as folder:
        try:
            mp.start_processes(_worker, args=(fields, data, folder), nprocs=config.nproc, join=True,
                               start_method="spawn")
        except mp.ProcessRaisedException as err:  # the rank's traceback is in the message
            raise RuntimeError(f"a rank of the sharded run failed (the others were stopped):\n{err}") from None
        except mp.ProcessExitedException as err:
            raise RuntimeError(f"a rank of the sharded run died: {err}") from None
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(config.nproc)]
        sharded_seconds = time.perf_counter() - t0
        reference, diff = None, None
        if config.reference:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                device = torch.device("cuda", 0) if config.device == "cuda" else torch.device("cpu")
                reference = train(config, device, data, sharded=False, adapter=Path(folder, "adapter_single"))
            diff = _adapter_diff(Path(folder, "adapter_sharded"), Path(folder, "adapter_single"))
        if config.save_adapter:
            shutil.copytree(Path(folder, "adapter_sharded"), config.save_adapter, dirs_exist_ok=True)
    record = summarize(config, ranks, reference, seconds={"sharded_run": sharded_seconds,
                                                           "total": time.perf_counter() - t0})
    record["adapter_max_abs_diff"] = diff  # sharded vs single-process LoRA weights after training (information)
    record["adapter_saved"] = str(config.save_adapter) if config.save_adapter else None
    return record
