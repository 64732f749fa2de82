"""GGUF, llama.cpp's file format: Q8_0 and Q4_0 blocks from scratch, and a Llama exported and read back.

A GGUF file is a header of key/value metadata (architecture, sizes, tokenizer), a table of tensors
(name, shape, type, offset) and the tensor data. Quantized tensors are rows cut into blocks of 32 values;
each block is stored as its own scale followed by its codes (llama.cpp's ggml-quants.c; gguf's quants.py):

    Q8_0  (34 bytes / 32 values = 8.5 bits)
        d = absmax / 127,  q = round_half_away_from_zero(x / d) in -127..127 (int8)
        bytes: d as fp16 (2), then the 32 codes as int8 (32);   x_hat = d * q
    Q4_0  (18 bytes / 32 values = 4.5 bits)
        M = the value of largest magnitude, sign kept;  d = M / -8
        q = min(15, trunc(x / d + 8.5)) in 0..15 (so M maps to code 0 and -M would be 16, clipped to 15)
        bytes: d as fp16 (2), then 16 bytes: byte j holds q[j] in its low nibble and q[j + 16] in its high
        nibble;   x_hat = d * (q - 8)

The scale is computed in fp32 (x / d as x * (1/d)) and then stored in fp16, exactly as llama.cpp does, so
the bytes here equal gguf.quants.quantize's byte for byte (tests/test_gguf_export.py).

`export_gguf(model, path, "Q8_0")` writes a transformers LlamaForCausalLM with the "llama" architecture
keys and llama.cpp's tensor names (gguf.get_tensor_name_map): every 2-D weight in the chosen type, the
RMSNorm scales in F32. q_proj and k_proj rows are permuted as llama.cpp's converter does (transformers
rotates the two halves of each head, llama.cpp interleaved pairs). Tokenizer metadata is optional: pass
a byte-level BPE tokenizer to add its tokens and merges ("gpt2" model, "default" pre-tokenizer: llama.cpp's
pre-tokenizer regex is not this tokenizer's, so llama.cpp may split text differently; not tried here).
`read_gguf(path)` reads it back with gguf.GGUFReader, dequantizes with gguf.quants.dequantize and undoes
the permutation, returning a transformers state dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "QTYPES",
    "dequantize_q4_0",
    "dequantize_q8_0",
    "export_gguf",
    "quantize_q4_0",
    "quantize_q8_0",
    "read_gguf",
]

BLOCK = 32
QTYPES = ("Q8_0", "Q4_0", "F16", "F32")


def _blocks(w: Tensor) -> Tensor:
    if not isinstance(w, Tensor) or not w.is_floating_point() or w.dim() == 0:
        raise ValueError(f"w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.shape[-1] % BLOCK:
        raise ValueError(f"w's last dimension must be a multiple of {BLOCK}, got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("w contains NaN or inf")
    return w.detach().float().reshape(-1, BLOCK)  # (n_blocks, 32)


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)  # an all-zero block gets codes of 0


def _as_bytes(d: Tensor, codes: Tensor, shape: torch.Size) -> np.ndarray:
    # Step 3: each block = its fp16 scale (2 bytes, little-endian) followed by its codes
    raw = torch.cat([d.half().view(torch.uint8), codes], dim=1)  # (n_blocks, 2 + code bytes)
    return raw.reshape(*shape[:-1], -1).numpy()  # (..., cols // 32 * block bytes)


def quantize_q8_0(w: Tensor) -> np.ndarray:
    """Q8_0 blocks of `w` (last dim a multiple of 32) as uint8 bytes, shape (..., cols // 32 * 34)."""
    x = _blocks(w)
    # Step 1: one scale per block, d = absmax / 127 in fp32
    d = x.abs().amax(dim=1, keepdim=True) / 127
    # Step 2: codes, rounded half away from zero (floor(|v|) + floor(2 * frac(|v|)) avoids 0.5 + 0.49999997)
    v = x * _inverse(d)
    a = v.abs()
    q = torch.sign(v) * (a.floor() + (2 * (a - a.floor())).floor())
    return _as_bytes(d, q.to(torch.int8).view(torch.uint8), w.shape)


def quantize_q4_0(w: Tensor) -> np.ndarray:
    """Q4_0 blocks of `w` (last dim a multiple of 32) as uint8 bytes, shape (..., cols // 32 * 18)."""
    x = _blocks(w)
    # Step 1: d = (the value of largest magnitude, with its sign) / -8; the first one on a tie
    m = x.gather(1, x.abs().argmax(dim=1, keepdim=True))
    d = m / -8
    # Step 2: codes 0..15 with an offset of 8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)  # (n_blocks, 32)
    packed = q[:, :16] | (q[:, 16:] << 4)  # byte j: q[j] low nibble, q[j + 16] high nibble
    return _as_bytes(d, packed, w.shape)


def _split(data, code_bytes: int, shape: tuple[int, ...] | None) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    raw = torch.as_tensor(np.ascontiguousarray(data), dtype=torch.uint8)
    if raw.shape[-1] % (2 + code_bytes):
        raise ValueError(f"data's last dimension must be a multiple of {2 + code_bytes} bytes, "
                         f"got {tuple(raw.shape)}")
    blocks = raw.reshape(-1, 2 + code_bytes)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (n_blocks, 1)
    out = shape or (*raw.shape[:-1], raw.shape[-1] // (2 + code_bytes) * BLOCK)
    return d, blocks[:, 2:], tuple(out)


def dequantize_q8_0(data, shape: tuple[int, ...] | None = None) -> Tensor:
    """x_hat = d * q from Q8_0 bytes (as quantize_q8_0 returns them), float32."""
    d, codes, shape = _split(data, BLOCK, shape)
    return (d * codes.view(torch.int8).float()).reshape(shape)


def dequantize_q4_0(data, shape: tuple[int, ...] | None = None) -> Tensor:
    """x_hat = d * (q - 8) from Q4_0 bytes (as quantize_q4_0 returns them), float32."""
    d, packed, shape = _split(data, BLOCK // 2, shape)
    q = torch.cat([packed & 0xF, packed >> 4], dim=1).float()  # (n_blocks, 32): low nibbles first
    return (d * (q - 8)).reshape(shape)


def _permute_qk(w: Tensor, heads: int) -> Tensor:
    """transformers' rotate-half row order -> llama.cpp's interleaved pairs (per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute_qk(w: Tensor, heads: int) -> Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _name_map(n_blocks: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)


def _add_tokenizer(writer, tokenizer) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"tokenizer must be a byte-level BPE tokenizer, got {spec['model']['type']}")
    vocab = spec["model"]["vocab"] | {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    kinds = {True: gguf.TokenType.CONTROL, False: gguf.TokenType.NORMAL}
    writer.add_token_types([kinds[t in special] for t in tokens])
    writer.add_token_merges(merges)
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)


def export_gguf(model, path, qtype: str = "Q8_0", *, tokenizer=None, quantizer: str = "qlearn") -> Path:
    """Write `model` (a transformers LlamaForCausalLM) to `path` as GGUF with 2-D weights in `qtype`.

    quantizer: "qlearn" (this module's blocks) or "gguf" (gguf.quants.quantize); same bytes either way.
    """
    import gguf

    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    if quantizer not in ("qlearn", "gguf"):
        raise ValueError(f"quantizer must be 'qlearn' or 'gguf', got {quantizer!r}")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        raise ValueError(f"model must be a transformers Llama model, got {type(model).__name__}")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    path = Path(path)
    writer = gguf.GGUFWriter(path, "llama")
    # Step 1: metadata, the keys llama.cpp reads for the "llama" architecture
    writer.add_name("qlearn tiny llama" if cfg.hidden_size == 256 else "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    ftypes = {"Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "F16": "MOSTLY_F16", "F32": "ALL_F32"}
    writer.add_file_type(gguf.LlamaFileType[ftypes[qtype]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer)
    # Step 2: tensors, renamed, q/k permuted, 2-D weights quantized (norms stay F32)
    names = _name_map(cfg.num_hidden_layers)
    ours = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0}
    for hf_name, w in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output.weight
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r}")
        w = w.detach().float().cpu()
        if hf_name.endswith("q_proj.weight"):
            w = _permute_qk(w, heads)
        elif hf_name.endswith("k_proj.weight"):
            w = _permute_qk(w, kv_heads)
        if w.dim() == 1 or qtype == "F32":
            writer.add_tensor(name, w.numpy())
        elif qtype == "F16":
            writer.add_tensor(name, w.half().numpy())
        else:
            gtype = gguf.GGMLQuantizationType[qtype]
            data = ours[qtype](w) if quantizer == "qlearn" else gguf.quants.quantize(w.numpy(), gtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gtype)
    # Step 3: header, key/values, tensor table, data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_gguf(path) -> tuple[dict[str, Tensor], dict]:
    """(state dict in transformers' names and layout, float32; metadata) of a GGUF file export_gguf wrote."""
    import gguf

    reader = gguf.GGUFReader(Path(path))
    long_lists = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    meta = {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.") and name not in long_lists}
    names = _name_map(meta["llama.block_count"])
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    hf_names = {}
    for hf_name in _hf_names(meta["llama.block_count"]):
        hf_names[names.get_name(hf_name, try_suffixes=(".weight",))] = hf_name
    state = {}
    for t in reader.tensors:
        # Step 1: dequantize with gguf; numpy shape is (rows, cols) while t.shape lists cols first
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
        hf_name = hf_names[t.name]
        # Step 2: undo llama.cpp's q/k row order
        if hf_name.endswith("q_proj.weight"):
            w = _unpermute_qk(w, heads)
        elif hf_name.endswith("k_proj.weight"):
            w = _unpermute_qk(w, kv_heads)
        state[hf_name] = w
    if "lm_head.weight" not in state:  # tied: the head is the embedding
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state, meta


def _hf_names(n_blocks: int) -> list[str]:
    block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    return (["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
            + [f"model.layers.{i}.{n}.weight" for i in range(n_blocks) for n in block])
