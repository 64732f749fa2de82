"""qlearn.quant.model.quantize_model on a small random Llama (and a plain MLP): every method, the report,
the sequential calibration, bad arguments."""

import pytest
import torch
from torch import nn

from qlearn.quant import model as qm

transformers = pytest.importorskip("transformers")


def _llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def _calib(n=4, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (length,), generator=g) for _ in range(n)]


def _linears(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize(("method", "bits", "group_size", "expected_bpp"), [
    ("rtn", 4, 32, 4 + 32 / 32),
    ("rtn", 3, None, None),  # per channel: checked layer by layer below
    ("hqq", 2, 32, 2 + 32 / 32),
    ("gptq", 4, 32, 4 + 32 / 32),
    ("awq", 3, 32, 3 + 32 / 32),
    ("nf4", 4, None, 4.5),
    ("fp4", 4, 32, 4 + 32 / 32),  # fp4 in blocks of 32 (blocksize=32)
])
def test_every_method_quantizes_all_linears_but_lm_head(method, bits, group_size, expected_bpp):
    model = _llama()
    before = _linears(model)
    embed = model.model.embed_tokens.weight.detach().clone()
    calib = _calib() if method in qm.CALIBRATED else None
    kwargs = {"blocksize": group_size} if method in ("nf4", "fp4") else {"group_size": group_size}
    assert qm.quantize_model(model, method, bits, calib=calib, **kwargs) is model  # in place, returns the model
    report = model.quant_report
    after = _linears(model)
    assert [r.name for r in report.layers] == [n for n in before if n != "lm_head"]
    assert report.kept == ["lm_head"] and torch.equal(after["lm_head"], before["lm_head"])
    assert torch.equal(model.model.embed_tokens.weight, embed)
    for layer in report.layers:
        w, w_hat = before[layer.name], after[layer.name]
        assert not torch.equal(w, w_hat) and torch.isfinite(w_hat).all()
        assert w_hat.unique().numel() <= w.numel()
        assert torch.equal(layer.state.dequantize(w.dtype), w_hat)  # the report keeps what was stored
        assert layer.bits_per_param == layer.state.bits_per_param()
    if group_size is not None or method in ("nf4", "fp4"):
        assert report.bits_per_param == pytest.approx(expected_bpp)
    else:  # per channel: 32 bits per row of 64 (attention, gate/up) or 128 (down_proj) weights
        assert all(r.bits_per_param == bits + 32 / r.shape[1] for r in report.layers)
    assert report.seconds > 0 and report.params == sum(r.params for r in report.layers)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(16)[None]).logits).all()


def test_8_bit_keeps_the_outputs_close():
    model, ref = _llama(), _llama()
    ids = torch.arange(32)[None]
    qm.quantize_model(model, "rtn", 8)
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert (a - b).abs().max() < 0.02 * b.abs().max()  # 8-bit per-channel: about 0.4% of the range per weight


def test_bits_per_param_counts_symmetric_and_double_quant():
    model = _llama()
    assert qm.quantize_model(model, "rtn", 4, 32, symmetric=True).quant_report.bits_per_param == pytest.approx(4.5)
    report = qm.quantize_model(_llama(), "nf4", 4, double_quant=True).quant_report
    # what is stored, per layer of n weights: 4-bit codes, an 8-bit absmax per 64, a float32 scale per 256
    # absmax (the last group partial) and one float32 offset; these layers are small (64 x 64 = 64 blocks),
    # so the partial group and the offset show: 4.136 bits instead of the large-tensor limit 4.127
    bits = sum(4 * n + 8 * (n // 64) + 32 * -(-(n // 64) // 256) + 32 for n in (r.params for r in report.layers))
    assert report.bits_per_param == pytest.approx(bits / report.params)
    big = qm.quantize_model(nn.Sequential(nn.Linear(4096, 1024)), "nf4", exclude=(), double_quant=True)
    assert round(big.quant_report.bits_per_param, 3) == 4.127


def test_nf4_simulation_equals_bitsandbytes_dequantized_weights():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    model = _llama()
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    qm.quantize_model(model, "nf4", 4)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, bnbF.dequantize_4bit(packed, state))


def test_block_replay_equals_whole_model_passes(monkeypatch):
    # The fast path (replaying decoder blocks from recorded inputs) must see exactly the inputs that
    # running the whole model would give: same quantized weights.
    fast, slow = _llama(), _llama()
    calib = _calib(n=3)
    qm.quantize_model(fast, "gptq", 3, 32, calib=calib)
    monkeypatch.setattr(qm, "_find_blocks", lambda model: None)
    qm.quantize_model(slow, "gptq", 3, 32, calib=calib)
    for (name, a), b in zip(_linears(fast).items(), _linears(slow).values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)  # float32 order of operations


def test_stages_group_layers_that_share_an_input():
    model = _llama()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    calib = qm._check_calib(_calib())
    stages = []
    for stage, X in qm._calibrated_stages(model, layers, calib):
        stages.append([n.split(".")[-1] for n in stage])
        assert X.shape == (4 * 32, layers[stage[0]].in_features)
    assert stages == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * 2


def test_gptq_on_a_plain_mlp_without_blocks():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Embedding(128, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 128))
    report = qm.quantize_model(mlp, "gptq", 4, calib=_calib(length=16, n=2), exclude=()).quant_report
    assert [r.name for r in report.layers] == ["1", "3"] and report.kept == []


def test_calibration_sequences_of_different_lengths_are_batched_by_length():
    batches = qm._check_calib([torch.arange(8), torch.arange(8), torch.arange(5)[None]])
    assert [tuple(b.shape) for b in batches] == [(2, 8), (1, 5)]


def test_report_table_and_repr():
    report = qm.quantize_model(_llama(), "rtn", 4, 32).quant_report
    lines = report.table().splitlines()
    assert len(lines) == 2 + 14 and lines[-1].startswith("total: 14 layers")
    assert "bits_per_param=5.000" in repr(report)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"method": "int4"}, ValueError, r"method must be one of \('rtn', 'gptq', 'awq', 'hqq', 'nf4', 'fp4'\)"),
    ({"method": "rtn", "bits": 9}, ValueError, "bits must be an int in 2..8, got 9"),
    ({"method": "rtn", "bits": 1}, ValueError, "bits must be an int in 2..8, got 1"),
    ({"method": "nf4", "bits": 3}, ValueError, "nf4 is a 4-bit code book: bits must be 4"),
    ({"method": "rtn", "group_size": 48}, ValueError,
     "model.layers.0.self_attn.q_proj has in_features=64, got group_size=48"),
    ({"method": "gptq"}, ValueError, "gptq needs calibration data: pass calib="),
    ({"method": "awq"}, ValueError, "awq needs calibration data"),
    ({"method": "gptq", "calib": [torch.rand(8)]}, ValueError, "calib must be a non-empty list of token-id"),
    ({"method": "awq", "calib": torch.arange(8)}, ValueError, "calib must be a non-empty list"),
    ({"method": "hqq", "symmetric": True}, ValueError, "hqq optimizes a zero point"),
    ({"method": "rtn", "exclude": ("",)}, ValueError, "the model has no nn.Linear layer to quantize"),
    ({"method": "nf4", "group_size": 64}, ValueError, "nf4 quantizes in blocks: pass blocksize="),
    ({"method": "rtn", "blocksize": 64}, ValueError, "rtn quantizes in groups: pass group_size="),
    ({"method": "nf4", "blocksize": 48}, ValueError, "has in_features=64, got blocksize=48"),
    ({"method": "rtn", "calib": [torch.arange(8)]}, ValueError, "rtn uses no calibration data"),
])
def test_bad_arguments_raise_before_any_weight_changes(kwargs, error, match):
    model = _llama()
    before = _linears(model)
    if kwargs.get("exclude") == ("",):
        kwargs["exclude"] = tuple(before)  # exclude every layer: nothing left
    with pytest.raises(error, match=match):
        qm.quantize_model(model, **kwargs)
    assert all(torch.equal(before[n], w) for n, w in _linears(model).items())


def test_quantized_restores_the_weights_and_quantize_copy_leaves_the_model_alone():
    model = _llama()
    before = _linears(model)
    with qm.quantized(model, "rtn", 3, 32) as report:
        assert report.bits_per_param == pytest.approx(3 + 32 / 32)
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj"])
    assert all(torch.equal(before[n], w) for n, w in _linears(model).items())
    assert not hasattr(model, "quant_report")
    with pytest.raises(RuntimeError, match="inside"), qm.quantized(model, "rtn", 4, 32):
        raise RuntimeError("an error inside the block")
    assert all(torch.equal(before[n], w) for n, w in _linears(model).items()), "restored after an error too"
    copy = qm.quantize_copy(model, "hqq", 2, 32)
    assert copy is not model and copy.quant_report.method == "hqq"
    assert all(torch.equal(before[n], w) for n, w in _linears(model).items())


def test_gptq_report_states_split_the_stacked_layers():
    model = _llama()
    report = qm.quantize_model(model, "gptq", 4, 32, calib=_calib()).quant_report
    q, k = report.states["model.layers.0.self_attn.q_proj"], report.states["model.layers.0.self_attn.k_proj"]
    assert q.shape == (64, 64) and q.scale.shape == (64, 2, 1) and k.q.shape == (64, 64)
    assert torch.equal(k.dequantize(), model.model.layers[0].self_attn.k_proj.weight)
