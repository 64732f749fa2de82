"""The `qlearn` command: doctor, lab, run, exercises build/check.

    qlearn doctor                           is this machine ready for the course?
    qlearn lab                              open JupyterLab on the course's notebooks
    qlearn run [NOTEBOOK ...]               execute notebooks headless, print a table of status and seconds
    qlearn exercises build [--out DIR]      learner copies: solutions replaced by stubs, outputs cleared
    qlearn exercises check DIR              run learner copies, print every exercise's status

Exit status: 0 when everything asked for succeeded; 1 when a check, a notebook or an exercise
failed; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..paths import ROOT, notebooks_dir

LAB_INSTALL = 'pip install -c constraints.txt -e ".[lab]"'
CHECK_EPILOG = """exit status: 0 when every notebook ran and every exercise PASSED (with --allow-missing,
NOT ATTEMPTED is fine too); 1 when an exercise FAILED or was NOT ATTEMPTED, a notebook could not
run, or no exercise was found."""


def _doctor(args) -> int:
    from .doctor import report, run_checks

    text, ok = report(run_checks())
    print(text)
    return 0 if ok else 1


def _lab(args) -> int:
    import importlib.util

    if importlib.util.find_spec("jupyterlab") is None:
        print(f"qlearn lab: JupyterLab is not installed; install the 'lab' extra: {LAB_INSTALL}",
              file=sys.stderr)
        return 1
    cmd = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={args.notebook_dir}", *args.extra]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:  # Ctrl-C stops the server: not an error
        return 0


def table(rows: list[tuple], header: tuple[str, ...]) -> str:
    """Rows as left-aligned columns under a header and a rule."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def _indented(source: str, limit: int = 25) -> str:
    lines = source.splitlines()
    shown = lines[:limit] + ([f"... ({len(lines) - limit} more lines)"] if len(lines) > limit else [])
    return "\n".join("    " + s for s in shown)


def _run(args) -> int:
    from tqdm import tqdm

    from .runner import find_notebooks, run_notebook

    paths = find_notebooks(args.notebooks, notebooks_dir())
    if not paths:
        print(f"qlearn run: no notebooks in {', '.join(args.notebooks) or notebooks_dir()}", file=sys.stderr)
        return 1
    results = []
    bar = tqdm(paths, unit="notebook", disable=args.quiet, file=sys.stderr)
    for path in bar:
        bar.set_description(path.name)
        results.append(run_notebook(path, timeout=args.timeout, write=args.write))
    print(table([(r.path.name, r.status, f"{r.seconds:.1f}") for r in results], ("notebook", "status", "seconds")))
    for r in results:
        if not r.ok:
            print(f"\n{r.path}: {r.status}: {r.error}", file=sys.stderr)
            if r.cell:
                print(f"failing cell ({r.cell_index}):\n{_indented(r.cell)}", file=sys.stderr)
    failed = sum(not r.ok for r in results)
    if args.write and results:
        written = sum(r.ok for r in results)
        print(f"outputs written to {written} notebook{'s' * (written != 1)} (failed ones left unchanged)")
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _build(args) -> int:
    from . import exercises
    from .runner import find_notebooks

    paths = find_notebooks(args.notebooks, notebooks_dir())
    try:
        written = exercises.build(paths, Path(args.out))
    except ValueError as err:
        print(f"qlearn exercises build: {err}", file=sys.stderr)
        return 1
    for path, n in written:
        print(f"{path}: {n} exercise{'s' * (n != 1)} stubbed")
    return 0


def _check(args) -> int:
    from . import exercises

    runs = exercises.check(args.dir, timeout=args.timeout)
    if not runs:
        print(f"qlearn exercises check: no notebooks in {', '.join(args.dir)}", file=sys.stderr)
        return 1
    rows, failures, ok = [], [], True
    for run, results in runs:
        name = run.path.name
        if not run.ok:
            ok = False
            rows.append((name, "-", f"notebook {run.status}", run.error[:90]))
        for r in results:
            rows.append((name, r.number, r.status, r.title))
            ok &= r.status == "PASSED" or (args.allow_missing and r.status == "NOT ATTEMPTED")
            if r.status == "FAILED":
                failures.append(f"{name} {r.number} {r.title}: {r.message}")
    n_ex = sum(len(results) for _, results in runs)
    print(table(rows, ("notebook", "exercise", "status", "detail")))
    for line in failures:
        print(f"\nFAILED {line}")
    counts = {s: sum(r.status == s for _, results in runs for r in results) for s in exercises.STATUSES}
    broken = sum(not run.ok for run, _ in runs)
    print("\n" + ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
          + f"; {broken} notebook{'s' * (broken != 1)} failed to run")
    if n_ex == 0:
        print("no exercise results found (no checker printed a line)", file=sys.stderr)
    return 0 if ok and n_ex else 1


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qlearn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("doctor", help="check Python, torch, the device, bitsandbytes, the libraries and the "
                                  "embedded model (exit 1 if a required check fails)")
    lab = sub.add_parser("lab", help="open JupyterLab on the notebooks")
    lab.add_argument("--notebook-dir", default=str(notebooks_dir()), help="folder to open (default: notebooks/)")
    lab.add_argument("extra", nargs=argparse.REMAINDER, help="further options for jupyter lab")
    run = sub.add_parser("run", help="execute notebooks headless (all by default)",
                         description="Execute notebooks in fresh kernels (working directory: each notebook's "
                                     "folder) and print a table; exit 1 if any failed. The files are not "
                                     "modified unless --write is given.")
    run.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                     help="notebook files or folders (default: every notebook of notebooks/)")
    run.add_argument("--write", action="store_true",
                     help="save each notebook that ran without error with its new outputs")
    run.add_argument("--timeout", type=int, default=600, metavar="S", help="seconds one cell may run (default 600)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    ex = sub.add_parser("exercises", help="build learner copies, or check them")
    ex_sub = ex.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = ex_sub.add_parser("build", help="learner copies: solutions replaced by stubs, outputs cleared")
    build.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                       help="notebooks or folders to copy (default: every notebook of notebooks/)")
    build.add_argument("--out", default=str(ROOT / "learner"), metavar="DIR",
                       help="folder for the copies (default: learner/ in the repository)")
    check = ex_sub.add_parser("check", help="run learner notebooks and report every exercise",
                              epilog=CHECK_EPILOG)
    check.add_argument("dir", nargs="+", metavar="DIR", help="folders of learner notebooks, or notebooks")
    check.add_argument("--allow-missing", action="store_true", help="NOT ATTEMPTED exercises do not fail the check")
    check.add_argument("--timeout", type=int, default=600, metavar="S", help="seconds one cell may run (default 600)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silences a debugger warning in kernels
    if args.command == "exercises":
        return (_build if args.action == "build" else _check)(args)
    return {"doctor": _doctor, "lab": _lab, "run": _run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
