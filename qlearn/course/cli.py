"""The `qlearn` command: doctor, lab, run, exercises build/check.

    qlearn doctor                           is this machine ready for the course?
    qlearn lab [JUPYTERLAB OPTION ...]      open JupyterLab on the course's notebooks
    qlearn run [NOTEBOOK ...]               execute notebooks headless, print a table of status and seconds
    qlearn exercises build [--out DIR]      learner copies: solutions replaced by stubs, outputs cleared
    qlearn exercises check DIR              run learner copies, print every exercise's status

Exit status: 0 when everything asked for succeeded; 1 when a check, a notebook or an exercise
failed; 2 for a usage error (a bad option, a notebook or folder that does not exist).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..paths import ROOT, notebooks_dir

LAB_INSTALL = 'pip install -c constraints.txt -e ".[lab]"'
LAB_DESCRIPTION = """Open JupyterLab on the course's notebooks (Ctrl-C twice stops it).

Every option qlearn does not know is passed on to JupyterLab (see `jupyter lab --help`), e.g.
    qlearn lab --no-browser --port 8899          a server for a browser elsewhere (a container, ssh)
    qlearn lab --ip 0.0.0.0 --no-browser         reachable from outside a container
Run as root (Docker, cloud containers, classroom images), qlearn adds --allow-root, which
JupyterLab otherwise demands, and says so in one line."""
CHECK_EPILOG = """exit status: 0 when every notebook ran and every exercise PASSED (with --allow-missing,
NOT ATTEMPTED is fine too); 1 when an exercise FAILED or was NOT ATTEMPTED, a notebook could not
run, or no exercise was found."""


def _doctor(args) -> int:
    from .doctor import report, run_checks

    text, ok = report(run_checks())
    print(text)
    return 0 if ok else 1


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0  # Windows has no root (and no geteuid)


def lab_command(notebook_dir: str, extra: list[str]) -> tuple[list[str], str]:
    """(the JupyterLab command line, a note to print or ""): `extra` passed on as given (a bare
    `--` dropped), plus --allow-root when run as root."""
    extra = [a for a in extra if a != "--"]  # `qlearn lab -- --opt` means the same as `qlearn lab --opt`
    note = ""
    if _is_root() and "--allow-root" not in extra:
        note = "qlearn lab: running as root (as in a container), so passing --allow-root to JupyterLab"
        extra.append("--allow-root")
    return [sys.executable, "-m", "jupyterlab", f"--notebook-dir={notebook_dir}", *extra], note


def _serve(cmd: list[str]) -> int:
    """Run the server until it exits; SIGTERM (`docker stop`, `kill`) and Ctrl-C let it shut its
    kernels down first. Stopping it on purpose is not an error (0)."""
    server = subprocess.Popen(cmd)
    stopped = False

    def stop(signum, frame):
        nonlocal stopped
        stopped = True
        server.terminate()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            try:
                code = server.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached JupyterLab too: it confirms and shuts down; wait
                stopped = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if stopped else code


def _lab(args) -> int:
    import importlib.util

    if importlib.util.find_spec("jupyterlab") is None:
        print(f"qlearn lab: JupyterLab is not installed; install the 'lab' extra: {LAB_INSTALL}",
              file=sys.stderr)
        return 1
    cmd, note = lab_command(args.notebook_dir, args.extra)
    if note:
        print(note, file=sys.stderr, flush=True)
    return _serve(cmd)


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


def _missing(command: str, paths: list[str]) -> int | None:
    """2 (a usage error, said in one line) when a named notebook or folder does not exist, else None."""
    missing = [p for p in paths if not Path(p).exists()]
    if not missing:
        return None
    print(f"qlearn {command}: no such notebook or folder: {', '.join(missing)}", file=sys.stderr)
    return 2


class CellBar:
    """One progress bar per notebook on stderr, counting its code cells as they run:
    `run_notebook(path, progress=CellBar(path.name))`, then `.close()`."""

    def __init__(self, name: str, disable: bool = False):
        self.name, self.disable, self.bar = name, disable, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.name, unit="cell", file=sys.stderr, disable=self.disable,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} cells [{elapsed}]")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_with_bar(path: Path, quiet: bool, **kwargs):
    from .runner import run_notebook

    bar = CellBar(path.name, disable=quiet)
    try:
        return run_notebook(path, progress=bar, **kwargs)
    finally:
        bar.close()


def _run(args) -> int:
    from .runner import find_notebooks

    if (code := _missing("run", args.notebooks)) is not None:
        return code
    paths = find_notebooks(args.notebooks, notebooks_dir())
    if not paths:
        print(f"qlearn run: no notebooks in {', '.join(args.notebooks) or notebooks_dir()}", file=sys.stderr)
        return 1
    results = [_run_with_bar(path, args.quiet, timeout=args.timeout, write=args.write) for path in paths]
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

    if (code := _missing("exercises build", args.notebooks)) is not None:
        return code
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
    from .runner import find_notebooks

    if (code := _missing("exercises check", args.dir)) is not None:
        return code
    paths = find_notebooks(args.dir, Path("."))
    if not paths:
        print(f"qlearn exercises check: no notebooks in {', '.join(args.dir)}", file=sys.stderr)
        return 1
    runs = exercises.check(paths, timeout=args.timeout, run=lambda path, **kw: _run_with_bar(path, args.quiet, **kw))
    rows, failures, ok = [], [], True
    for run, results in runs:
        name = run.path.name
        if not run.ok:
            ok = False
            rows.append((name, "-", f"notebook {run.status}", (run.error.splitlines() or [""])[0][:90]))
            failures.append(f"{name} (the notebook stopped): {run.error}")
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
    lab = sub.add_parser("lab", help="open JupyterLab on the notebooks (other options go to JupyterLab)",
                         description=LAB_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                         usage="qlearn lab [-h] [--notebook-dir DIR] [JUPYTERLAB OPTION ...]",
                         allow_abbrev=False)  # `--no` must reach JupyterLab, not match --notebook-dir
    lab.add_argument("--notebook-dir", default=str(notebooks_dir()), metavar="DIR",
                     help="folder to open (default: notebooks/)")
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
    check.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args, extra = ap.parse_known_args(argv)  # only `lab` takes options it does not know (JupyterLab's)
    if extra and args.command != "lab":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silences a debugger warning in kernels
    if args.command == "exercises":
        return (_build if args.action == "build" else _check)(args)
    return {"doctor": _doctor, "lab": _lab, "run": _run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
