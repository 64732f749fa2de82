"""Run every course notebook on a GPU with nbval in lax mode and record pass/fail and seconds.

    python benchmarks/gpu_notebooks.py [--out benchmarks/gpu/notebooks.json] [NOTEBOOK ...]

`pytest --nbval-lax` executes each notebook top to bottom (outputs are not compared: a GPU prints
other timings and devices) and fails on any error; a notebook's seconds are the sum of its cells'
durations from pytest's JUnit report. Notebook 10 measures its GPU figures anew here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/gpu/notebooks.json"))
    ap.add_argument("notebooks", nargs="*")
    args = ap.parse_args()
    notebooks = args.notebooks or sorted(str(p) for p in Path("notebooks").glob("*.ipynb"))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=",
                        "--nbval-lax", "--nbval-cell-timeout=900", f"--junitxml={report}", "-q", *notebooks])
        cases = ET.parse(report).getroot().iter("testcase")
        per = defaultdict(lambda: {"seconds": 0.0, "cells": 0, "failed_cells": 0, "error": ""})
        for case in cases:
            name = Path(case.get("classname", "").replace(".", "/")).name or case.get("file", "")
            key = next((Path(n).name for n in notebooks if Path(n).stem in case.get("classname", "")), name)
            per[key]["seconds"] += float(case.get("time", 0))
            per[key]["cells"] += 1
            failures = [child for child in case if child.tag in ("failure", "error")]
            per[key]["failed_cells"] += bool(failures)
            if failures and not per[key]["error"]:  # the first failing cell: its name and the error's last lines
                text = (failures[0].text or failures[0].get("message", "")).strip()
                per[key]["error"] = f"{case.get('name')}: ..." + text[-1500:]
    rows = {k: {"status": "failed" if v["failed_cells"] else "passed", "seconds": round(v["seconds"], 1),
                "cells": v["cells"], **({"error": v["error"]} if v["error"] else {})} for k, v in sorted(per.items())}
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              else "cpu", "versions": {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")},
              "passed": sum(r["status"] == "passed" for r in rows.values()),
              "failed": sum(r["status"] == "failed" for r in rows.values()), "notebooks": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.notebooks and args.out.exists():  # a partial run updates the record of the other notebooks
        old = json.loads(args.out.read_text())
        result["notebooks"] = dict(sorted({**old.get("notebooks", {}), **rows}.items()))
        result["passed"] = sum(r["status"] == "passed" for r in result["notebooks"].values())
        result["failed"] = sum(r["status"] == "failed" for r in result["notebooks"].values())
    args.out.write_text(json.dumps(result, indent=1))
    for k, r in rows.items():
        print(f"{k:<40}{r['status']:<8}{r['seconds']:7.1f} s")
    print(f"{result['passed']} passed, {result['failed']} failed")


if __name__ == "__main__":
    main()
