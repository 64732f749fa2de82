"""Generate the fine-tuning tasks of the course (data/tasks/<name>.jsonl), seeded and reproducible.

Both tasks rewrite Python keyword arguments, a skill the embedded model (pretrained on the Python
documentation) has the pieces for but was never asked to perform, so the base model fails them
zero-shot while LoRA learns them in a minute on a CPU:

    to_dict    "Call: connect(host='db', port=5432)\nDict:"  ->  " {'host': 'db', 'port': 5432}"
    to_kwargs  "Dict: {'host': 'db', 'port': 5432}\nKwargs:"  ->  " host='db', port=5432"

Each line of the .jsonl is {"split": "train"|"test", "prompt": ..., "answer": ...}; the answer
starts with a space (it continues the prompt) and the model should then emit end-of-text.
Every example draws a function name (verb_noun), 1 to 3 distinct keyword names and values
(integers, short strings, True/False/None) from fixed word lists; test examples are distinct from
all train examples (their keyword-name sets never occur in train, so the test needs generalization
and not recall).

    python scripts/make_tasks.py [--seed 0] [--train 1200] [--test 200]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERBS = ["open", "read", "write", "load", "save", "parse", "format", "connect", "send", "fetch", "build",
         "create", "update", "delete", "compile", "encode", "decode", "start", "stop", "run", "check",
         "copy", "move", "sort", "merge", "split", "join", "find", "match", "render"]
NOUNS = ["file", "config", "header", "socket", "record", "table", "message", "buffer", "stream", "path",
         "request", "response", "archive", "entry", "event", "queue", "thread", "process", "module",
         "cache", "index", "token", "value", "node", "tree", "image", "report", "user", "session", "page"]
KEYS = ["host", "port", "timeout", "mode", "encoding", "name", "path", "size", "level", "retries",
        "verbose", "strict", "limit", "offset", "delay", "key", "default", "prefix", "suffix", "flags",
        "count", "width", "depth", "user", "format", "errors", "newline", "buffering", "closefd", "family"]
STRINGS = ["'db'", "'r'", "'w'", "'rb'", "'utf-8'", "'ascii'", "'main'", "'test'", "'data'", "'log'",
           "'tmp'", "'root'", "'guest'", "'json'", "'csv'", "'strict'", "'ignore'", "'replace'", "'x'", "'id'"]


def value(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        return str(rng.choice([rng.randint(0, 9), rng.randint(10, 99), rng.randint(100, 9999)]))
    if kind < 0.85:
        return rng.choice(STRINGS)
    return rng.choice(["True", "False", "None"])


def example(rng: random.Random, keys: tuple[str, ...]) -> dict:
    func = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
    pairs = [(k, value(rng)) for k in keys]
    kwargs = ", ".join(f"{k}={v}" for k, v in pairs)
    as_dict = "{" + ", ".join(f"'{k}': {v}" for k, v in pairs) + "}"
    return {"func": func, "kwargs": kwargs, "dict": as_dict}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--test", type=int, default=200)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    # Step 1: for each length (1 to 3 names), hold out a tenth of the ordered keyword-name tuples.
    by_len: dict[str, dict[int, list[tuple[str, ...]]]] = {"train": {}, "test": {}}
    for n in (1, 2, 3):
        sets = list(itertools.permutations(KEYS, n))
        rng.shuffle(sets)
        cut = max(3, len(sets) // 10)
        by_len["test"][n], by_len["train"][n] = sets[:cut], sets[cut:]
    # Step 2: draw examples; lengths 1/2/3 equally likely in both splits.
    for task in ("to_dict", "to_kwargs"):
        task_rng = random.Random(f"{args.seed}-{task}")
        rows = []
        for split, count in (("train", args.train), ("test", args.test)):
            seen = set()
            while len([r for r in rows if r["split"] == split]) < count:
                pool = by_len[split][task_rng.choice((1, 2, 3))]
                ex = example(task_rng, task_rng.choice(pool))
                if task == "to_dict":
                    prompt, answer = f"Call: {ex['func']}({ex['kwargs']})\nDict:", f" {ex['dict']}"
                else:
                    prompt, answer = f"Dict: {ex['dict']}\nKwargs:", f" {ex['kwargs']}"
                if prompt in seen:
                    continue
                seen.add(prompt)
                rows.append({"split": split, "prompt": prompt, "answer": answer})
        out = ROOT / "data" / "tasks" / f"{task}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{out.relative_to(ROOT)}: {args.train} train, {args.test} test")


if __name__ == "__main__":
    main()
