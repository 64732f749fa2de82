"""The fine-tuning tasks: load them, turn them into training batches, score a model on them.

A task is data/tasks/<name>.jsonl (made by scripts/make_tasks.py): rows of prompt and answer, split
into train and test. Training teaches the model to continue `prompt` with `answer` + end-of-text;
only the answer's tokens carry loss (the prompt's labels are -100, as in instruction tuning).
The score is exact match of greedy decoding:

    accuracy = (1/N) * sum_i [ strip(generate(prompt_i)) == strip(answer_i) ]

where generation stops at end-of-text or a newline.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch

from .paths import data_dir

__all__ = ["TASKS", "Task", "batches", "encode", "evaluate", "generate", "load"]

TASKS = ("to_dict", "to_kwargs")
IGNORE = -100  # label of a position that carries no loss (PyTorch's cross_entropy ignore_index)


@dataclass(frozen=True)
class Task:
    name: str
    train: list[dict]
    test: list[dict]

    def __repr__(self) -> str:
        return f"Task({self.name!r}, train={len(self.train)}, test={len(self.test)})"


def _check_name(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"name must be one of {TASKS}, got {name!r}")


def load(name: str) -> Task:
    """The task's train and test examples, each a dict with "prompt" and "answer"."""
    _check_name(name)
    rows = [json.loads(line) for line in (data_dir() / "tasks" / f"{name}.jsonl").read_text().splitlines()]
    return Task(name, [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "test"])


def encode(tokenizer, examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on the prompt and the padding)."""
    seqs, labels = [], []
    for ex in examples:
        p = tokenizer(ex["prompt"]).input_ids  # starts with <s>
        a = tokenizer(ex["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        seqs.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),  # (B, T)
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels]),
    }


def batches(tokenizer, name: str, batch_size: int = 16, *, seed: int = 0, split: str = "train"):
    """An endless iterator of shuffled, encoded batches of the task (reshuffled every epoch)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    examples = list(getattr(load(name), split))
    rng = random.Random(seed)
    while True:
        rng.shuffle(examples)
        for i in range(0, len(examples) - batch_size + 1, batch_size):
            yield encode(tokenizer, examples[i: i + batch_size])


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 40, batch_size: int = 50) -> list[str]:
    """Greedy continuations of `prompts`, cut at end-of-text or the first newline."""
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # so every prompt ends where generation starts
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i: i + batch_size], return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in gen[:, enc.input_ids.shape[1]:]:
                outs.append(tokenizer.decode(row, skip_special_tokens=True).split("\n")[0])
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def evaluate(model, tokenizer, name: str, *, split: str = "test", n: int | None = None,
             examples: list[dict] | None = None) -> float:
    """Exact-match accuracy (0..1) of greedy decoding on the first `n` examples of `split`."""
    _check_name(name)
    if examples is None:
        examples = getattr(load(name), split) if split in ("train", "test") else None
        if examples is None:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n is not None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int or None, got {n!r}")
        examples = examples[:n]
    got = generate(model, tokenizer, [ex["prompt"] for ex in examples])
    return sum(g.strip() == ex["answer"].strip() for g, ex in zip(got, examples)) / len(examples)
