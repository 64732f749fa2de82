"""The sizes of a Llama-style decoder that memory depends on.

Llama shapes (hidden, heads, layers) are the LLaMA paper's Table 2 (Touvron et al. 2023,
arXiv:2302.13971); MLP widths and the 32000-token vocabulary are those of the released checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LLAMA_SHAPES", "Shape", "shape_of"]

# LLaMA paper Table 2: hidden size, heads, layers; the MLP width (SwiGLU, 2/3 x 4h rounded up to a multiple
# of 256) and the vocabulary from the released configs. "tiny" is the course's embedded model (data/tiny).
LLAMA_SHAPES = {
    "llama-7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "vocab": 32000},
    "llama-13b": {"hidden": 5120, "intermediate": 13824, "layers": 40, "heads": 40, "vocab": 32000},
    "llama-33b": {"hidden": 6656, "intermediate": 17920, "layers": 60, "heads": 52, "vocab": 32000},
    "llama-65b": {"hidden": 8192, "intermediate": 22016, "layers": 80, "heads": 64, "vocab": 32000},
    # Llama 2 70B (Touvron et al. 2023b, arXiv:2307.09288): grouped-query attention with 8 key/value heads
    "llama-2-70b": {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "vocab": 32000},
    "tiny": {"hidden": 256, "intermediate": 768, "layers": 6, "heads": 4, "vocab": 8192},
}


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-style decoder that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    kv_heads: int | None = None  # None: as many as heads (no grouped-query attention)
    head_dim: int | None = None  # None: hidden // heads
    tied: bool = False  # the head shares the embedding matrix

    def __post_init__(self):  # fill the defaults in, so that equal shapes compare equal
        object.__setattr__(self, "kv_heads", self.kv_heads or self.heads)
        object.__setattr__(self, "head_dim", self.head_dim or self.hidden // self.heads)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of the 7 linear layers of one block."""
        h, m = self.hidden, self.intermediate
        return [("q_proj", h, self.q_width), ("k_proj", h, self.kv_width), ("v_proj", h, self.kv_width),
                ("o_proj", self.q_width, h), ("gate_proj", h, m), ("up_proj", h, m), ("down_proj", m, h)]

    def block_tensors(self) -> list[int]:
        """Sizes of one block's parameter tensors: 7 weights and 2 RMSNorm scales."""
        return [i * o for _, i, o in self.linears()] + [self.hidden, self.hidden]

    def tensors(self) -> list[int]:
        """Sizes of every parameter tensor: embedding, L blocks, final norm, head (unless tied)."""
        head = [] if self.tied else [self.vocab * self.hidden]
        return [self.vocab * self.hidden] + self.block_tensors() * self.layers + [self.hidden] + head

    @property
    def params(self) -> int:
        return sum(self.tensors())

    @property
    def linear_params(self) -> int:
        """Parameters of the block linear layers (what 4-bit/8-bit loading quantizes)."""
        return self.layers * sum(i * o for _, i, o in self.linears())


def shape_of(model_or_config) -> Shape:
    """A Shape from a known name (LLAMA_SHAPES), a transformers config, a model, or a Shape."""
    if isinstance(model_or_config, Shape):
        return model_or_config
    if isinstance(model_or_config, str):
        if model_or_config not in LLAMA_SHAPES:
            raise ValueError(f"model_or_config must be one of {sorted(LLAMA_SHAPES)}, a transformers config "
                             f"or a model, got {model_or_config!r}")
        return Shape(**LLAMA_SHAPES[model_or_config])
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        shape = Shape(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                      layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, vocab=cfg.vocab_size,
                      kv_heads=getattr(cfg, "num_key_value_heads", None),
                      head_dim=getattr(cfg, "head_dim", None), tied=bool(getattr(cfg, "tie_word_embeddings", False)))
    except AttributeError as err:
        raise ValueError(f"model_or_config must be a known name, a Llama-style transformers config or a "
                         f"model with one ({err})") from err
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("model_or_config: linear layers with biases are not modelled "
                         "(attention_bias/mlp_bias)")
    return shape


