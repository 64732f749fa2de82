"""FSDP-QLoRA: fine-tuning one model across N processes with PyTorch's FSDP2, checked against one process.

    python -m qlearn.fsdp --nproc 2 --device cpu --steps 3 [--method lora|qlora] [--shape tiny|llama-1b|...]
    qlearn.fsdp.run(qlearn.fsdp.FSDPConfig(nproc=2, method="qlora")) -> dict  (the same record)

Why: data parallelism gives each of N GPUs its own batch; FSDP (ZeRO-3's idea, Rajbhandari et al. 2020)
also gives each only 1/N of the model. Every parameter is split along its first dimension into N shards;
before a block computes, its shards are all-gathered into full weights, used, and freed; gradients are
reduce-scattered, so each rank keeps, and its optimizer updates, only its shard. Per GPU (the ledger,
`qlearn.memory.estimate(..., n_gpus=N, sharding="full")`): weights, gradients and optimizer states / N;
activations are not divided (each rank has its own batch). QLoRA's 4-bit weights shard like any other
parameter as long as they are stored in a float dtype: bitsandbytes packs 4 codes in a bf16 element
(bnb_4bit_quant_storage=bfloat16); the 4-bit scales (quant_state) are not parameters and stay whole on
every rank.

What a run does (qlearn.fsdp.run): spawns N ranks (gloo on the CPU, NCCL on CUDA, one GPU each), builds
the model on each (the embedded "tiny" model, or a Llama shape with random weights: llama-1b, llama-8b,
llama-2-70b, made on the meta device and filled layer by layer, 4-bit linears quantized as made), adds PEFT LoRA
(r=8, alpha=16, all 7 linear layers of every block), shards it with `torch.distributed.fsdp.fully_shard`
(one unit per block + a root unit) and trains `steps` AdamW steps, rank r on its slice of a global batch of
the course's validation text; then trains the same model in one process, unsharded, on the whole global
batch. The last line printed is a JSON record:
    ranks, param_bytes_per_rank (bytes of parameters each rank holds after sharding), param_bytes_total,
    losses (per step, the global batch's loss, averaged over ranks with an all-reduce),
    single_process_losses, trainable_per_rank (logical counts), peak_bytes_per_rank (CUDA; null on the CPU),
    grad/optimizer/quant_state/replicated bytes per rank, the ledger's prediction (ledger_per_rank,
    ledger_single_process, and on CUDA their error against the peaks), step times and CPU seconds,
    packed (QLoRA: the packed NF4 bytes viewed as bf16: elements and NaN bit patterns, and whether the sharded
    run changed any byte), checks (qlearn.fsdp.checks: 1/N each, losses equal within a measured tolerance,
    trainable counts equal, loss finite and not 0.0, packed bytes unchanged) and ok.

bitsandbytes' CPU backend under FSDP2 (torch 2.13, bitsandbytes 0.50.2, gloo): it works. A Linear4bit whose
weight is a bf16- or fp32-stored Params4bit is sharded by fully_shard; in the forward pass FSDP2 puts a plain
unsharded tensor back on the module and bitsandbytes restores its quant_state from the module (its FSDP
support), so the CPU run does QLoRA, with losses equal to the single-process run's and no packed byte
changed. On the CPU the model is float32 (no fast bf16 matrix units: a bf16 step of the tiny model is ~25x
slower here), so quant_storage is float32, the same bytes as bf16 storage; the record counts their bf16 NaN
patterns too. Two caveats: call qlearn.models.keep_standard_layout first (done here), and the bf16 NaN
rewriting of bitsandbytes#1945 is a CUDA copy's: FSDP2 packs each rank's shards into the all-gather buffer
with torch._foreach_copy_, which on CUDA writes every bf16 NaN as one canonical pattern (pytorch#159333)
and on the CPU keeps the bytes (checked). So the CPU cannot show it, and neither, probably, can one GPU
(with N = 1 FSDP2 skips the all-gather and copies with copy_); the packed check of a run on 2 or more
GPUs is the one that can fail.

Measured on the 2-core CPU (tiny, 2 ranks, 3 steps, float32): LoRA and QLoRA losses equal the reference's
to 4.8e-7 and 2.4e-7 (loss ~3.4; tolerance in qlearn.fsdp.checks), each rank holds exactly half of the
parameters, and its weights, gradients and AdamW states equal `estimate(..., n_gpus=2, sharding="full")`
byte for byte (LoRA; QLoRA's 4-bit scales to 1%). 1000 of the 1,277,952 packed elements viewed as bf16 are
NaN patterns (0.078%). The accelerate#3983 route, `--quant-storage uint8 --replicate-incompatible` (the
4-bit weights in ignored_params, as accelerate does): same losses, but each rank holds 56.3% instead of 50%
(the 2.56 MB of packed weights whole on both), so each_rank_holds_1_over_n fails and the exit status is 1.
`--save-adapter DIR` gathers the trained LoRA weights (PEFT's format) so that one process can merge them
(PeftModel.from_pretrained, then merge_and_unload into the unquantized base): PEFT cannot merge a sharded model.

Refused, with the reason (qlearn.fsdp.config): nproc < 1; more ranks than visible GPUs; a missing backend;
quant_storage != the model's dtype (the 4-bit weights would silently stay whole on every rank:
accelerate#3983); trainable parameters of two dtypes in one unit ("Must flatten tensors with uniform
dtype" in FSDP1, "FSDP expects uniform original parameter dtype" in FSDP2). FSDP1 (FullyShardedDataParallel)
refuses a CPU altogether ("FSDP needs a non-CPU accelerator device"), one reason this uses FSDP2.
Not exercised on the CPU: cpu_offload (FSDP2's CPUOffloadPolicy with bitsandbytes weights; CUDA only, untried).
"""

from .checks import LOSS_TOLERANCE, ledgers, summarize
from .config import SHAPES, FSDPConfig, check_backend
from .model import build, check_unit_dtypes, nan_patterns, shard
from .run import global_batches, run, train

__all__ = ["LOSS_TOLERANCE", "SHAPES", "FSDPConfig", "build", "check_backend", "check_unit_dtypes",
           "global_batches", "ledgers", "nan_patterns", "run", "shard", "summarize", "train"]
