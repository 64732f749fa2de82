"""The opt-in constraints override: constraints.txt with the pins of the libraries that move lifted,
so the suite can run against their newest releases before a learner's Colab does.

    python scripts/latest_constraints.py > latest.txt         # constraints.txt without MOVING's pins
    python scripts/latest_constraints.py --names              # the lifted names, one line
    pip install -U -c latest.txt $(python scripts/latest_constraints.py --names)

`.ci/run --latest` does exactly this after the README's set-up, then runs tests/test_drift.py
first (every keyword the course passes still exists) and the rest of the suite.
Name other packages to lift them instead: `python scripts/latest_constraints.py transformers peft`.
"""

from __future__ import annotations

import argparse
import sys

from make_binder_requirements import ROOT, name_of

# The course's libraries whose releases change what the notebooks call (and the hub client and
# tokenizer they pin each other to, which must move with them). torch stays: PyPI's newest on
# Linux is a CUDA build of several GB.
MOVING = ("accelerate", "bitsandbytes", "gguf", "hf-xet", "huggingface-hub", "peft", "safetensors",
          "tokenizers", "torchao", "transformers")


def lifted(names: tuple[str, ...] = MOVING) -> str:
    """constraints.txt's text without the lines pinning `names` (other lines and comments kept)."""
    names = {name_of(n) for n in names}
    keep = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
            if not ("==" in line and name_of(line.split("#")[0]) in names)]
    return "\n".join(keep) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"packages to lift (default: {' '.join(MOVING)})")
    ap.add_argument("--names", dest="list_names", action="store_true", help="print the lifted names only")
    args = ap.parse_args(argv)
    names = tuple(args.names) or MOVING
    pinned = {name_of(line.split("#")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    unknown = [n for n in names if name_of(n) not in pinned]
    if unknown:
        ap.error(f"names: not pinned in constraints.txt: {', '.join(unknown)}")
    print(" ".join(names) if args.list_names else lifted(names), end="\n" if args.list_names else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
