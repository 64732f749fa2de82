"""python -m qlearn.fsdp --nproc N --device cpu|cuda --steps K [--method lora|qlora] [--shape tiny|...]

Runs the sharded fine-tuning (qlearn.fsdp), prints a line per check on stderr and, last on stdout, the
JSON record. Exit status 0 when every check passed, 1 when one failed, 2 when the configuration was refused
(the JSON line then holds "error").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ADAPTER_DTYPES, DEVICES, METHODS, SHAPES, STORAGE, FSDPConfig


def parse(argv=None) -> tuple[dict, Path | None]:
    ap = argparse.ArgumentParser(prog="python -m qlearn.fsdp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes (ranks); one per GPU on CUDA")
    ap.add_argument("--device", default="cpu", choices=DEVICES)
    ap.add_argument("--method", default="lora", choices=METHODS)
    ap.add_argument("--shape", default="tiny", choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2, help="sequences per rank and step")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="the model's dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    ap.add_argument("--quant-storage", default=None, choices=STORAGE,
                    help="qlora: bnb_4bit_quant_storage (default: the model's dtype; another is refused)")
    ap.add_argument("--adapter-dtype", default="float32", choices=ADAPTER_DTYPES)
    ap.add_argument("--replicate-incompatible", action="store_true",
                    help="run a refused --quant-storage uint8 the way accelerate does (replicated; a demo)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--cpu-offload", action="store_true", help="FSDP2's CPUOffloadPolicy (CUDA only)")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the single-process reference run")
    ap.add_argument("--save-adapter", default=None, metavar="DIR",
                    help="save the trained adapter (gathered from the shards) in PEFT's format to DIR")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON record to this file")
    args = vars(ap.parse_args(argv))
    out = args.pop("out")
    return args, out


def main(argv=None) -> int:
    fields, out = parse(argv)
    try:
        config = FSDPConfig(**fields)
        from .run import run

        record = run(config)
    except (ValueError, RuntimeError) as err:
        print(f"qlearn.fsdp: {err}", file=sys.stderr)
        print(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}))
        return 2
    for name, passed in record["checks"].items():
        print(f"  {'ok  ' if passed else 'FAIL'} {name}", file=sys.stderr)
    line = json.dumps(record)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
    print(line)
    return 0 if record["ok"] else 1


if __name__ == "__main__":  # the spawned ranks import this module too: only the launcher runs main
    sys.exit(main())
