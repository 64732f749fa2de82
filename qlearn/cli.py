"""The `qlearn` command: doctor, lab, run, exercises build/check.

    qlearn doctor                      is this machine ready? (exit 1 if not)
    qlearn lab                         open JupyterLab on the course's notebooks
    qlearn run [NOTEBOOK ...]          execute notebooks headless, print a table (exit 1 on failure)
    qlearn exercises build [--out D]   learner copies: solutions replaced by stubs, outputs cleared
    qlearn exercises check DIR         run learner copies, print each exercise's status
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .paths import ROOT, notebooks_dir


def _doctor(args) -> int:
    from .doctor import report, run_checks

    text, ok = report(run_checks())
    print(text)
    return 0 if ok else 1


def _lab(args) -> int:
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        print('JupyterLab is not installed: pip install -c constraints.txt -e ".[lab]"', file=sys.stderr)
        return 1
    cmd = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={notebooks_dir()}", *args.extra]
    return subprocess.call(cmd)


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def _run(args) -> int:
    from tqdm import tqdm

    from .runner import find_notebooks, run_notebook

    paths = find_notebooks(args.notebooks, notebooks_dir())
    if not paths:
        print(f"no notebooks found in {args.notebooks or notebooks_dir()}", file=sys.stderr)
        return 1
    results = []
    bar = tqdm(paths, unit="notebook", disable=args.quiet)
    for path in bar:
        bar.set_description(path.name)
        results.append(run_notebook(path, timeout=args.timeout, write=args.write))
    print(_table([(r.path.name, r.status, f"{r.seconds:.1f}") for r in results], ("notebook", "status", "seconds")))
    for r in results:
        if not r.ok:
            print(f"\n{r.path}: {r.status}: {r.error}", file=sys.stderr)
            if r.cell:
                src = r.cell if len(r.cell) < 1200 else r.cell[:1200] + "\n..."
                print("failing cell:\n" + "\n".join("    " + s for s in src.splitlines()), file=sys.stderr)
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _exercises(args) -> int:
    from . import exercises

    if args.action == "build":
        out = Path(args.out)
        for path, n in exercises.build(notebooks_dir(), out):
            print(f"{path}: {n} exercise{'s' if n != 1 else ''} stubbed")
        return 0
    rows, all_passed, broken = [], True, 0
    for run, results in exercises.check(args.dir, timeout=args.timeout):
        if not run.ok:
            broken += 1
            rows.append((run.path.name, "-", "notebook " + run.status, run.error[:100]))
        for r in results:
            rows.append((run.path.name, r.number, r.status, (r.title + (": " + r.message if r.message else ""))[:100]))
            all_passed &= r.status == "PASSED" or (args.allow_missing and r.status == "NOT ATTEMPTED")
    print(_table(rows, ("notebook", "exercise", "status", "detail")) if rows else "no exercises found")
    counts = {s: sum(r[2] == s for r in rows) for s in ("PASSED", "FAILED", "NOT ATTEMPTED")}
    print(", ".join(f"{n} {s.lower()}" for s, n in counts.items()) + f", {broken} notebooks failed to run")
    return 0 if all_passed and not broken and rows else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qlearn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check Python, torch, the device, bitsandbytes and the embedded model")
    lab = sub.add_parser("lab", help="open JupyterLab on the notebooks")
    lab.add_argument("extra", nargs=argparse.REMAINDER, help="passed to jupyter lab")
    run = sub.add_parser("run", help="execute notebooks headless (all by default)")
    run.add_argument("notebooks", nargs="*", help="notebook files or folders (default: the course's notebooks)")
    run.add_argument("--write", action="store_true", help="save the executed notebooks with their outputs")
    run.add_argument("--timeout", type=int, default=600, help="seconds a cell may run (default 600)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    ex = sub.add_parser("exercises", help="build learner copies, or check them").add_subparsers(
        dest="action", required=True)
    build = ex.add_parser("build", help="learner copies: solutions replaced by stubs, outputs cleared")
    build.add_argument("--out", default=str(ROOT / "learner"), help="output folder (default learner/)")
    check = ex.add_parser("check", help="run learner notebooks and report every exercise")
    check.add_argument("dir", nargs="+", help="learner notebooks or their folder")
    check.add_argument("--allow-missing", action="store_true", help="NOT ATTEMPTED does not fail")
    check.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args(argv)
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silences a debugger warning in kernels
    return {"doctor": _doctor, "lab": _lab, "run": _run, "exercises": _exercises}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
