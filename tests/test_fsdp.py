"""qlearn.fsdp: the 2-process gloo run checks itself; the refusals; FSDP2's own rules behind them."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from qlearn import fsdp
from qlearn.fsdp import checks, config
from qlearn.paths import ROOT


def _run_cli(*args: str, timeout: int = 900) -> tuple[dict, int, float]:
    """`python -m qlearn.fsdp ARGS` as a notebook cell would launch it: (last stdout line as JSON, rc, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qlearn.fsdp", *args], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1]), proc.returncode, seconds


@pytest.fixture(scope="module")
def cpu_qlora_run(tmp_path_factory):
    adapter = tmp_path_factory.mktemp("adapter")
    record, rc, seconds = _run_cli("--nproc", "2", "--device", "cpu", "--steps", "3", "--method", "qlora",
                                   "--save-adapter", str(adapter))
    print(f"2-rank CPU QLoRA run: {seconds:.1f} s (total as the record sees it: {record.get('seconds')})")
    return record, rc


def test_two_rank_cpu_qlora_run_passes_its_own_checks(cpu_qlora_run):
    record, rc = cpu_qlora_run
    assert rc == 0 and record["ok"], record.get("checks") or record.get("error")
    assert set(record["checks"]) == {"each_rank_holds_1_over_n", "losses_match_single_process", "trainable_equal",
                                     "loss_finite_nonzero", "packed_bytes_unchanged"}
    assert record["ranks"] == 2 and record["backend"] == "gloo" and len(record["losses"]) == 3
    # every dimension of the tiny model is even: each rank holds exactly half, nothing is replicated
    assert record["param_bytes_per_rank"] == [record["param_bytes_total"] // 2] * 2
    assert record["replicated_param_bytes_per_rank"] == [0, 0]
    lora = 6 * 8 * (4 * (256 + 256) + 3 * (256 + 768))  # r = 8 on q, k, v, o (256 x 256) and the MLP's 256 x 768
    assert record["trainable_per_rank"] == [record["single_process_trainable"]] * 2 == [lora] * 2
    assert record["peak_bytes_per_rank"] is None  # the CPU has no allocator statistics to report


def test_two_rank_losses_equal_the_single_process_run_within_the_measured_tolerance(cpu_qlora_run):
    record, _ = cpu_qlora_run
    rel = max(abs(a - b) / b for a, b in zip(record["losses"], record["single_process_losses"]))
    # LOSS_TOLERANCE[float32] = 1e-5 relative: reduction order only, measured <= 3.4e-7 (qlearn.fsdp.checks)
    assert rel <= checks.LOSS_TOLERANCE[torch.float32] == record["loss_rtol"], record["losses"]
    assert rel == record["max_loss_rel_diff"]
    assert record["losses"][-1] < record["losses"][0] - 0.1  # it trains (3.47 -> 2.84 in 3 steps here)


def test_packed_nf4_bytes_are_unchanged_and_their_bf16_nan_patterns_counted(cpu_qlora_run):
    packed = cpu_qlora_run[0]["packed"]
    shape = 6 * (4 * 256 * 256 + 3 * 256 * 768)  # 4-bit weights of the tiny model's 42 linear layers
    assert packed["bytes"] == shape // 2 and packed["elements_bf16"] == shape // 4
    assert packed["storage"] == "float32"  # the model's dtype on the CPU; the same bytes as bf16 storage
    # integer count of bit patterns: exact (NF4 codes come from absmax, one division and comparisons, all
    # exactly rounded); 1000 / 1,277,952 = 0.078%, the size bitsandbytes#1945 reports (~0.1%)
    assert packed["nan_patterns_bf16"] == 1000
    assert packed["changed_in_forward_per_rank"] == packed["changed_in_shards_per_rank"] == [0, 0]
    assert packed["layers_seen_per_rank"] == [42, 42]


def test_each_ranks_bytes_equal_the_sharded_ledger(cpu_qlora_run):
    record, _ = cpu_qlora_run
    ledger = record["ledger_per_rank"]
    assert record["grad_bytes_per_rank"] == [ledger["gradients"]] * 2
    assert record["optimizer_bytes_per_rank"] == [ledger["optimizer"]] * 2
    held = record["param_bytes_per_rank"][0] + record["quant_state_bytes_per_rank"][0]
    # 1%: the ledger's 4.127 bits leave out bitsandbytes' per-tensor code books (16 + 256 floats per layer)
    assert abs(ledger["weights"] / held - 1) < 0.01, (ledger["weights"], held)


def test_the_adapter_gathered_from_the_shards_merges_in_one_process(cpu_qlora_run):
    """PEFT cannot merge a sharded model: the run saves the gathered adapter, and one process merges it into
    the unquantized base (the safe path: merging into the 4-bit base would re-quantize W + BA)."""
    from peft import PeftModel

    from qlearn.models import load_model

    record, _ = cpu_qlora_run
    # information, not a check: AdamW's first steps move each weight by about +-lr whatever the gradient's size,
    # so rounding that flips a near-zero gradient's sign moves it by up to 2 lr a step; measured 1.8e-5
    assert record["adapter_max_abs_diff"] < 2 * 1e-3 * 3
    base, tok = load_model("tiny", device="cpu", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, record["adapter_saved"])
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 42 and all(p.abs().max() > 0 for p in lora_b)  # trained: B moved away from 0
    x = tok("The course ships its own small model.", return_tensors="pt").input_ids
    with torch.no_grad():
        unmerged = model(x).logits
        merged = model.merge_and_unload()(x).logits
    # float32 rounding of W + scaling * B A against x W^T + scaling * (x A^T) B^T: measured 9e-6 on logits
    # up to 14 (B ~ N(0, 3e-3), about what 3 steps give)
    assert torch.allclose(merged, unmerged, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the NCCL path of qlearn.fsdp")
def test_one_gpu_qlora_run_records_its_memory():
    record, rc, _ = _run_cli("--nproc", "1", "--device", "cuda", "--method", "qlora", "--steps", "3")
    assert rc == 0 and record["ok"], record.get("checks") or record.get("error")
    assert record["backend"] == "nccl" and record["packed"]["storage"] == "bfloat16"
    assert record["peak_bytes_per_rank"][0] > record["resident_bytes_per_rank"][0] > 0


# ---------------------------------------------------------------- refusals, each with its reason

@pytest.mark.parametrize("kwargs, match", [
    ({"nproc": 0}, "nproc must be an int >= 1, got 0"),
    ({"steps": 1.5}, "steps must be an int >= 1"),
    ({"method": "dora"}, r"method must be one of \('lora', 'qlora'\)"),
    ({"shape": "llama-405b"}, "shape must be one of"),
    ({"device": "tpu"}, r"device must be one of \('cpu', 'cuda'\)"),
    ({"dtype": "float64"}, "dtype must be None, 'float32', 'bfloat16' or 'float16'"),
    ({"quant_storage": "int4"}, "quant_storage must be None"),
    ({"quant_storage": "bfloat16"}, "quant_storage is for method='qlora'"),
    ({"method": "qlora", "quant_storage": "uint8"}, r"differs from the model's dtype float32: .*accelerate#3983"),
    ({"method": "qlora", "quant_storage": "bfloat16"}, "cast the packed bytes as if they were numbers"),
    ({"cpu_offload": True}, "cpu_offload=True .* needs device='cuda'"),
    ({"adapter_dtype": "mixed"}, r"adapter_dtype must be one of \('float32', 'model'\)"),
])
def test_config_refuses_bad_input_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fsdp.FSDPConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
def test_cuda_is_refused_without_a_gpu_and_beyond_the_visible_gpus(monkeypatch):
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        fsdp.FSDPConfig(device="cuda", nproc=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="nproc=2 but 1 CUDA GPU"):
        fsdp.FSDPConfig(device="cuda", nproc=2)


def test_a_missing_backend_is_named(monkeypatch):
    import torch.distributed as dist

    assert fsdp.check_backend("cpu") == "gloo"
    monkeypatch.setattr(dist, "is_gloo_available", lambda: False)
    with pytest.raises(RuntimeError, match="the 'gloo' distributed backend is missing"):
        fsdp.check_backend("cpu")
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(RuntimeError, match="'nccl' .*NCCL ships with Linux CUDA wheels only"):
        fsdp.check_backend("cuda")


def test_cli_prints_the_refusal_as_its_last_json_line(capsys):
    from qlearn.fsdp.__main__ import main

    assert main(["--nproc", "0"]) == 2
    out = capsys.readouterr()
    record = json.loads(out.out.strip().splitlines()[-1])
    assert record["ok"] is False and "nproc must be an int >= 1" in record["error"] and "nproc" in out.err


# ---------------------------------------------------------------- FSDP2's rules the refusals rest on

@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_rejects_two_trainable_dtypes_in_a_unit_and_check_unit_dtypes_says_so_first(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    mixed = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16))
    with pytest.raises(ValueError, match="trains parameters of 2 dtypes: float32 .*bfloat16 .*uniform dtype"):
        fsdp.check_unit_dtypes([mixed])
    fully_shard(mixed)
    with pytest.raises(AssertionError, match="FSDP expects uniform original parameter dtype"):
        mixed(torch.randn(2, 8))  # FSDP2 checks at its lazy init, the first forward


def test_fsdp2_takes_frozen_weights_of_another_dtype_beside_float32_adapters(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    class Adapted(nn.Module):  # a frozen bf16 layer and a float32 adapter beside it, as PEFT builds them
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
            self.adapter = nn.Linear(8, 8)

        def forward(self, x):
            return self.base(x).float() + self.adapter(x.float())

    torch.manual_seed(0)
    model = Adapted()
    fsdp.check_unit_dtypes([model])  # one trainable dtype: allowed
    fully_shard(model)
    model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
    assert model.adapter.weight.grad is not None and model.adapter.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------- pieces

def test_nan_patterns_counts_the_254_bf16_nans_among_all_65536_bit_patterns():
    every = torch.from_numpy(np.arange(65536, dtype=np.uint16).view(np.uint8).copy())
    assert fsdp.nan_patterns(every) == 2 * 127  # sign either way, exponent 0xFF, mantissa one of 1..127
    assert fsdp.nan_patterns(torch.tensor([0x80, 0x7F, 0xC0, 0x7F, 0x00, 0x00], dtype=torch.uint8)) == 1  # inf, NaN, 0


def test_global_batches_are_fixed_windows_that_the_ranks_split():
    cfg = fsdp.FSDPConfig(nproc=2, batch_size=2, steps=3, seq_len=16)
    data = fsdp.global_batches(cfg)
    assert data.shape == (3, 4, 16) and torch.equal(data, fsdp.global_batches(cfg))
    ranks = [data[:, r * 2:(r + 1) * 2] for r in range(2)]
    assert torch.equal(torch.cat(ranks, dim=1), data) and not torch.equal(ranks[0], ranks[1])


def _rank(**over):
    base = {"param_bytes_total": 100, "param_bytes": 50, "imbalance_bound_bytes": 4, "replicated_param_bytes": 0,
            "quant_state_bytes": 0, "grad_bytes": 8, "optimizer_bytes": 20, "losses": [3.0, 2.5], "trainable": 10,
            "peak_bytes": None, "step_seconds": [0.1, 0.1]}
    return base | over


@pytest.mark.parametrize("ranks, reference, failed", [
    ([_rank(), _rank()], _rank(), set()),
    ([_rank(param_bytes=90, replicated_param_bytes=80), _rank(param_bytes=90, replicated_param_bytes=80)], _rank(),
     {"each_rank_holds_1_over_n"}),  # 4-bit weights left whole on every rank (accelerate#3983's fix)
    ([_rank(losses=[0.0, 0.0]), _rank(losses=[0.0, 0.0])], None, {"loss_finite_nonzero"}),
    ([_rank(losses=[3.0, 2.6]), _rank(losses=[3.0, 2.6])], _rank(), {"losses_match_single_process"}),
    ([_rank(), _rank(trainable=11)], _rank(), {"trainable_equal"}),
])
def test_summarize_fails_the_check_that_a_broken_run_breaks(ranks, reference, failed):
    cfg = fsdp.FSDPConfig(nproc=2, steps=2)
    record = checks.summarize(cfg, ranks, reference, seconds={"total": 1.0})
    assert {k for k, ok in record["checks"].items() if not ok} == failed
    assert record["ok"] is (not failed)


def test_the_storage_refusal_explains_why_it_would_silently_unshard():
    assert "every rank keeps all of them" in config.QUANT_STORAGE_WHY and "accelerate#3983" in config.QUANT_STORAGE_WHY


# ---------------------------------------------------------------- the random-weight shapes (the GPU runs' path)

SMALL_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 8192, "tie_word_embeddings": True}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_random_llama_shape_builds_alike_twice_and_trains_sharded_on_one_rank(method, monkeypatch, one_rank_group):
    """What `--shape llama-8b` does on a GPU, on a small shape: meta-device build, each linear quantized as
    it is made, tied embeddings kept tied; one-rank FSDP training; the packed-byte checks."""
    monkeypatch.setitem(config.SHAPES, "small", SMALL_SHAPE)
    cfg = fsdp.FSDPConfig(nproc=1, method=method, shape="small", steps=1, seq_len=16)
    a, b = fsdp.build(cfg, torch.device("cpu")), fsdp.build(cfg, torch.device("cpu"))
    def raw(t):  # bytes: packed 4-bit data viewed as float32 holds NaN patterns, and NaN != NaN
        return t.detach().contiguous().reshape(-1).view(torch.uint8)

    assert all(torch.equal(raw(x), raw(y)) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    base = a.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert not any(p.is_meta for p in a.parameters())
    out = fsdp.train(cfg, torch.device("cpu"), fsdp.global_batches(cfg), sharded=True)
    assert all(np.isfinite(out["losses"])) and out["param_bytes"] == out["param_bytes_total"]  # N = 1: all of it
    if method == "qlora":
        assert out["packed"]["layers_seen"] == 2 * 7 and out["packed"]["changed_in_forward"] == 0
        assert out["packed"]["changed_in_shards"] == 0
