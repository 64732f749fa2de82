"""Build the wheelhouse of an offline classroom (docs/instructor.md): every package the course
installs, as files, so that classroom machines install it with no network:

    python scripts/make_wheelhouse.py                       # -> wheelhouse/ (149 files, 0.43 GB on Linux x86-64)
    pip install --no-index --find-links wheelhouse -c constraints.txt -e ".[test,lab]"   # then, offline

Run it on a machine with internet access and the classroom's operating system, CPU architecture and
Python version (wheels are built for one platform; for another, see docs/instructor.md).
Step 1: torch's CPU build from PyTorch's CPU index (on Linux PyPI's torch is the CUDA build, GBs),
        without its dependencies (step 2 fetches them at their pins).
Step 2: every pin of constraints.txt (the tested set; torch is found in the wheelhouse: 2.13.0+cpu
        sorts above PyPI's 2.13.0).
Step 3: qlearn's build back-end (pyproject's [build-system]), which `pip install -e .` needs offline.
--torch-find-links DIR takes step 1's wheel from a folder instead (a machine that reaches PyPI but not
PyTorch's index, like CI's).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from make_binder_requirements import ROOT, pins, tomllib

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def steps(out: Path, torch_find_links: Path | None = None) -> list[list[str]]:
    """The three `pip download` commands (see the module docstring)."""
    pip = [sys.executable, "-m", "pip", "download", "--dest", str(out)]
    torch = f"torch=={pins()['torch']}"
    where = ["--no-index", "--find-links", str(torch_find_links)] if torch_find_links else ["--index-url", CPU_INDEX]
    backend = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return [
        [*pip, "--no-deps", *where, torch],  # Step 1
        [*pip, "--find-links", str(out), "-r", str(ROOT / "constraints.txt")],  # Step 2
        [*pip, *backend],  # Step 3
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "wheelhouse", help="the folder to fill (default: wheelhouse/)")
    ap.add_argument("--torch-find-links", type=Path, metavar="DIR",
                    help="a folder holding torch's CPU wheel, instead of PyTorch's CPU index")
    args = ap.parse_args(argv)
    if args.torch_find_links and not any(args.torch_find_links.glob("torch-*.whl")):
        ap.error(f"--torch-find-links: no torch-*.whl in {args.torch_find_links}")
    args.out.mkdir(parents=True, exist_ok=True)
    for k, cmd in enumerate(steps(args.out, args.torch_find_links), 1):
        print(f"step {k}: {' '.join(cmd[3:])}", flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            print(f"step {k} failed: {' '.join(cmd)}", file=sys.stderr)
            return 1
    files = sorted(args.out.iterdir())
    size = sum(f.stat().st_size for f in files) / 1e9
    print(f"{args.out}: {len(files)} files, {size:.2f} GB. On each classroom machine, offline:\n"
          f'  pip install --no-index --find-links {args.out.name} -c constraints.txt -e ".[test,lab]"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
