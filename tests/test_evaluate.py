"""qlearn.evaluate: token windows (tokenized once, then cached) and perplexity."""

import math

import pytest
import torch

import qlearn
from qlearn import evaluate


@pytest.fixture(scope="module")
def tiny():
    return qlearn.load_model("tiny", device="cpu")


def test_token_windows_are_tokenized_once_and_handed_out_as_copies(tiny, monkeypatch):
    _, tok = tiny
    first = evaluate.token_windows(tok, seq_len=128, max_tokens=4096)
    calls = []
    monkeypatch.setattr(evaluate, "_tokenize", lambda *a: calls.append(a) or torch.zeros(1, 2, dtype=torch.long))
    again = evaluate.token_windows(tok, seq_len=128, max_tokens=4096)
    assert calls == [] and torch.equal(first, again)  # served from the cache
    again[0, 0] = -1  # a caller changing its copy does not change the cache
    assert torch.equal(evaluate.token_windows(tok, seq_len=128, max_tokens=4096), first)
    evaluate.token_windows(tok, seq_len=64, max_tokens=4096)  # other windows: tokenized anew
    evaluate.token_windows(tok, "some other text " * 50, seq_len=8, max_tokens=64)
    assert len(calls) == 2


def test_perplexity_is_exp_of_the_mean_next_token_loss(tiny):
    model, tok = tiny
    windows = evaluate.token_windows(tok, seq_len=64, max_tokens=256)
    with torch.no_grad():
        loss = model(windows, labels=windows).loss.item()  # transformers' mean over the predicted tokens
    assert evaluate.perplexity(model, tok, seq_len=64, max_tokens=256) == pytest.approx(math.exp(loss), rel=1e-5)


def test_bad_arguments_raise_clear_errors(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        evaluate.token_windows(tok, seq_len=1)
    with pytest.raises(ValueError, match="max_tokens must be an int >= seq_len"):
        evaluate.token_windows(tok, seq_len=64, max_tokens=32)
    with pytest.raises(ValueError, match="texts must be None, a string or a non-empty list"):
        evaluate.token_windows(tok, [])
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate.token_windows(tok, "short", seq_len=64, max_tokens=64)
