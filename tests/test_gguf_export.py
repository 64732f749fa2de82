"""qlearn.gguf_export: Q8_0/Q4_0 blocks byte for byte against gguf, and a Llama exported and read back."""

import filecmp

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlearn import gguf_export as G

gguf = pytest.importorskip("gguf")
Q8, Q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0


def _weight(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    flat[:32] = 0.0  # an all-zero block: scale 0, codes of 0
    flat[40], flat[41] = 0.5, -0.5  # a tie in magnitude: the first one sets Q4_0's sign
    flat[70] = 1e4 * 0.02  # an outlier
    return w


SHAPES = [(64, 256), (256,), (3, 4, 96)]


@pytest.mark.parametrize("shape", SHAPES)
def test_q8_0_bytes_equal_ggufs(shape):
    w = _weight(shape)
    ours, theirs = G.quantize_q8_0(w), gguf.quants.quantize(w.numpy(), Q8)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape == (*shape[:-1], shape[-1] // 32 * 34)
    assert np.array_equal(ours, theirs)
    assert torch.equal(G.dequantize_q8_0(ours), torch.from_numpy(gguf.quants.dequantize(theirs, Q8)))


@pytest.mark.parametrize("shape", SHAPES)
def test_q4_0_bytes_equal_ggufs(shape):
    w = _weight(shape)
    ours, theirs = G.quantize_q4_0(w), gguf.quants.quantize(w.numpy(), Q4)
    assert ours.shape == theirs.shape == (*shape[:-1], shape[-1] // 32 * 18)
    assert np.array_equal(ours, theirs)
    assert torch.equal(G.dequantize_q4_0(ours), torch.from_numpy(gguf.quants.dequantize(theirs, Q4)))


def test_bf16_input_gives_the_same_bytes_as_its_float32_copy():
    w = _weight((8, 64)).bfloat16()
    assert np.array_equal(G.quantize_q4_0(w), gguf.quants.quantize(w.float().numpy(), Q4))


def test_q8_0_block_layout_and_rounding_half_away_from_zero():
    x = torch.zeros(32)
    x[:5] = torch.tensor([127.0, -127.0, 2.5, -2.5, 0.49999997])  # absmax 127: d = 1
    raw = G.quantize_q8_0(x)
    assert raw[:2].tobytes() == np.float16(1.0).tobytes()  # the scale first, fp16 little-endian
    assert raw[2:7].view(np.int8).tolist() == [127, -127, 3, -3, 0]  # torch.round would give 2, -2


def test_q4_0_block_layout_low_nibbles_hold_the_first_16_codes():
    q = torch.tensor(list(range(16)) + list(range(15, -1, -1)))
    x = (q - 8).float()  # the largest magnitude is -8 (code 0): d = -8 / -8 = 1
    raw = G.quantize_q4_0(x)
    assert raw[:2].tobytes() == np.float16(1.0).tobytes()
    assert raw[2:].tolist() == [j | (15 - j) << 4 for j in range(16)]
    assert torch.equal(G.dequantize_q4_0(raw), x)


def test_round_trip_error_is_half_a_step_plus_the_fp16_scale():
    blocks = _weight((16, 128), seed=1).reshape(-1, 32)
    # Q8_0: d = absmax / 127, every value within half a step
    err = (G.dequantize_q8_0(G.quantize_q8_0(blocks)) - blocks).abs()
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    # half a step, plus the scale's fp16 rounding (2^-11 relative) times the largest code (127)
    assert (err <= d * (0.5 + 127 * 2**-11)).all()
    # Q4_0: d = M / -8 covers codes -8..7: values past +7 d (the side opposite M) clip, within one step
    err = (G.dequantize_q4_0(G.quantize_q4_0(blocks)) - blocks).abs()
    d = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True)) / -8
    clipped = torch.nan_to_num(blocks / d) > 7.5
    assert clipped.any() and (err <= d.abs() * (torch.where(clipped, 1.0, 0.5) + 8 * 2**-11)).all()


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(10), "multiple of 32"), (torch.zeros(32, dtype=torch.int32), "floating-point"),
    (torch.full((32,), float("nan")), "NaN or inf"), ("x", "floating-point"),
])
def test_quantizers_reject_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        G.quantize_q8_0(bad)
    with pytest.raises(ValueError, match=match):
        G.quantize_q4_0(bad)


def test_dequantize_rejects_a_byte_count_that_is_not_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 34 bytes"):
        G.dequantize_q8_0(np.zeros(35, dtype=np.uint8))


def test_qk_permutation_is_llama_cpps_and_inverts():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of 8 rows
    p = G._permute_qk(w, heads=2)
    # rows i and i + 4 of each head (the halves rotate_half pairs) become neighbours 2i, 2i + 1
    assert torch.equal(p[0], w[0]) and torch.equal(p[1], w[4]) and torch.equal(p[2], w[1])
    assert torch.equal(p[8], w[8]) and torch.equal(p[9], w[12])
    assert torch.equal(G._unpermute_qk(p, heads=2), w)


def _tiny_llama(tied=False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        tie_word_embeddings=tied))


@pytest.mark.parametrize("qtype, quantize, dequantize", [("Q8_0", G.quantize_q8_0, G.dequantize_q8_0),
                                                        ("Q4_0", G.quantize_q4_0, G.dequantize_q4_0)])
def test_export_then_read_back_gives_the_dequantized_weights(tmp_path, qtype, quantize, dequantize):
    model = _tiny_llama()
    ours = G.export_gguf(model, tmp_path / "ours.gguf", qtype)
    theirs = G.export_gguf(model, tmp_path / "theirs.gguf", qtype, quantizer="gguf")
    assert filecmp.cmp(ours, theirs, shallow=False)  # qlearn's blocks or gguf's: the same file
    state, meta = G.read_gguf(ours)
    expected = model.state_dict()
    assert set(state) == set(expected)
    for name, w in expected.items():
        if w.dim() == 1:
            assert torch.equal(state[name], w)  # RMSNorm scales are stored in F32
        else:
            assert torch.equal(state[name], dequantize(quantize(w)))  # row blocks survive the permutation
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{qtype}"])


def test_the_read_back_model_computes_what_the_dequantized_model_computes(tmp_path):
    model = _tiny_llama(tied=True)
    state, _ = G.read_gguf(G.export_gguf(model, tmp_path / "m.gguf", "Q8_0"))
    copy = _tiny_llama(tied=True)
    copy.load_state_dict(state)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(x).logits, copy(x).logits
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    # Q8_0 weights: logits move by about 1% of their spread, never by as much as the spread
    assert 0 < (got - ref).abs().max() < 0.05 * ref.std()


def test_q4_0_file_is_about_half_the_q8_0_file(tmp_path):
    model = _tiny_llama()
    sizes = {q: G.export_gguf(model, tmp_path / f"{q}.gguf", q).stat().st_size
             for q in ("Q8_0", "Q4_0", "F16")}
    assert sizes["Q4_0"] < sizes["Q8_0"] < sizes["F16"]
    quantized = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    # the difference is the quantized weights' 8.5 - 4.5 bits, give or take the header's alignment padding
    assert abs((sizes["Q8_0"] - sizes["Q4_0"]) - quantized * 4 / 8) < 32 * 32


def test_tokenizer_metadata_from_the_embedded_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from qlearn.paths import data_dir

    tok = AutoTokenizer.from_pretrained(data_dir() / "tiny")
    path = G.export_gguf(_tiny_llama(), tmp_path / "t.gguf", "Q8_0", tokenizer=tok)
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(tok) and tokens[tok.eos_token_id] == tok.eos_token
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 1000


@pytest.mark.parametrize("kwargs, match", [({"qtype": "Q5_K"}, "qtype must be one of"),
                                           ({"quantizer": "llama.cpp"}, "quantizer must be")])
def test_export_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.export_gguf(_tiny_llama(), tmp_path / "x.gguf", **kwargs)
    with pytest.raises(ValueError, match="transformers Llama model"):
        G.export_gguf(torch.nn.Linear(32, 32), tmp_path / "x.gguf")
