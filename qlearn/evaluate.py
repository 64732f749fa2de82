"""Perplexity: how surprised a language model is by held-out text.

    perplexity = exp( (1/N) * sum_t -log p(x_t | x_<t) )

over N predicted tokens. The text is tokenized once, cut into non-overlapping windows of
`seq_len` tokens (each window predicts its tokens 2..seq_len from the ones before), and the mean
negative log-likelihood is taken over all predicted tokens of the first `max_tokens` tokens.
Non-overlapping windows give every token less context than a sliding window would, so the number
is a little higher than a sliding-window perplexity; it is the same protocol for every model in
the course, which is what comparisons need.

The default text is data/val.txt, the shipped validation split of the course's corpus, which the
embedded model never saw in training. Its windows are tokenized once per tokenizer and cached
(`token_windows`), so evaluating many quantized variants costs only their forward passes.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .paths import data_dir

__all__ = ["perplexity", "token_windows", "validation_text"]


def validation_text() -> str:
    return (data_dir() / "val.txt").read_text(encoding="utf-8")


_WINDOWS: dict[tuple, torch.Tensor] = {}  # (tokenizer, text digest, seq_len, max_tokens) -> windows


def token_windows(tokenizer, texts: list[str] | str | None = None, seq_len: int = 256,
                  max_tokens: int = 8192) -> torch.Tensor:
    """The evaluation windows: a (num_windows, seq_len) tensor of token ids (a fresh copy of the
    cached tokenization: the same tokenizer, texts, seq_len and max_tokens are tokenized once)."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if not isinstance(max_tokens, int) or max_tokens < seq_len:
        raise ValueError(f"max_tokens must be an int >= seq_len ({seq_len}), got {max_tokens!r}")
    if texts is None:
        texts = [validation_text()]
    elif isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be None, a string or a non-empty list of strings")
    digest = hashlib.sha1("\x00".join(texts).encode()).hexdigest()
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), len(tokenizer), digest, seq_len, max_tokens)
    if key not in _WINDOWS:
        _WINDOWS[key] = _tokenize(tokenizer, texts, seq_len, max_tokens)
    return _WINDOWS[key].clone()


def _tokenize(tokenizer, texts: list[str], seq_len: int, max_tokens: int) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)  # no max-length warning: we cut windows
        ids.append(tokenizer.eos_token_id)
    n = min(len(ids), max_tokens) // seq_len
    if n == 0:
        raise ValueError(f"texts hold {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)  # (windows, T)


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str] | str | None = None, *, seq_len: int = 256,
               max_tokens: int = 8192, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of `model` on `texts` (default: the shipped validation split).

    Deterministic (eval mode, fixed windows). A NaN or inf loss raises instead of being returned.
    """
    windows = token_windows(tokenizer, texts, seq_len, max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1].float()  # (B, T-1, V)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    mean = total / count
    if not math.isfinite(mean):
        raise FloatingPointError(f"the model's loss is {mean}: its weights or activations hold NaN/inf")
    return math.exp(mean)
