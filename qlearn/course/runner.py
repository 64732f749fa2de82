"""Run notebooks headless, the way CI and an instructor's pre-workshop check do.

`run_notebook(path)` reads the notebook, executes every cell in a fresh kernel started in the
notebook's folder (nbclient), and returns a `RunResult`: passed, failed (a cell raised, timed out or
the kernel died) or invalid (not a readable notebook), the seconds it took and, on failure, the
failing cell's source and the error. The file is executed as a copy in memory and written back only
with `write=True` and only when every cell passed (authors refresh committed outputs that way); a
notebook that cannot be read, or that fails, is never overwritten. `progress(done, total)`, when
given, is called before the first code cell and after each one (the CLI draws a bar with it).

A failure always carries a reason: the exception's message, or, for a bare `assert` (no message),
the failing statement as the traceback shows it ("cell 29: AssertionError at line 4: assert a < b").
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NOTEBOOK_SUFFIX", "RunResult", "find_notebooks", "read_notebook", "run_notebook"]

NOTEBOOK_SUFFIX = ".ipynb"
STATUSES = ("passed", "failed", "invalid")


@dataclass
class RunResult:
    path: Path
    status: str  # one of STATUSES
    seconds: float = 0.0
    error: str = ""  # one line: what went wrong
    cell: str = ""  # source of the failing cell
    cell_index: int = -1  # its index in the notebook (0-based), -1 when no cell is to blame
    notebook: object = None  # the executed nbformat notebook (outputs included), when it ran

    @property
    def ok(self) -> bool:
        return self.status == "passed"


def find_notebooks(paths: list[str] | None, default_dir: Path) -> list[Path]:
    """The notebooks named (files, or folders whose *.ipynb are taken), else every notebook of
    `default_dir`; sorted within each folder, in the order given otherwise. Names that are not
    notebooks are kept, so that `run_notebook` can say what is wrong with them."""
    if not paths:
        return sorted(Path(default_dir).glob(f"*{NOTEBOOK_SUFFIX}"))
    found: list[Path] = []
    for p in map(Path, paths):
        found.extend(sorted(p.glob(f"*{NOTEBOOK_SUFFIX}")) if p.is_dir() else [p])
    return found


def read_notebook(path: Path):
    """The notebook at `path` (nbformat v4), or ValueError saying, with the file's name, why not."""
    import nbformat

    if not path.exists():
        raise ValueError(f"no such notebook: {path}")
    if path.suffix != NOTEBOOK_SUFFIX or not path.is_file():
        raise ValueError(f"not a notebook: {path} (expected a {NOTEBOOK_SUFFIX} file)")
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # JSON errors, schema errors, undecodable bytes: all mean "not a notebook"
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read {path} as a notebook: {type(err).__name__}: {first}") from err
    return nb


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ARROW = re.compile(r"^-+> *(\d+) (.*)$")  # IPython's traceback marks the failing line: "----> 4 assert a < b"


def _failing_line(traceback: list[str]) -> str:
    """"line N: statement" of the cell's frame (the first frame) in an IPython traceback, or ""."""
    for line in _ANSI.sub("", "\n".join(traceback)).splitlines():
        if m := _ARROW.match(line.strip()):
            return f"line {m.group(1)}: {m.group(2).strip()}"
    return ""


def _error_cell(nb) -> tuple[int, str, str]:
    """(index, source, "Name: message") of the first cell with an error output; without a message,
    "Name at line N: statement"."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                name, message = out.get("ename"), str(out.get("evalue") or "").strip()
                where = _failing_line(out.get("traceback", []))
                return i, cell.source, f"{name}: {message}" if message or not where else f"{name} at {where}"
    return -1, "", ""


def _tail(log, lines: int = 5) -> str:
    log.seek(0)
    tail = [line for line in log.read().splitlines() if line.strip()][-lines:]
    return ("; kernel log: " + " | ".join(tail)) if tail else ""


def run_notebook(path: str | Path, *, timeout: int = 600, write: bool = False,
                 kernel_name: str = "python3",
                 progress: Callable[[int, int], None] | None = None) -> RunResult:
    """Execute the notebook at `path` in a fresh kernel (working directory: its folder).

    `timeout` is the seconds any one cell may run. With `write=True` a notebook whose every cell
    passed is saved with its new outputs; otherwise the file is left exactly as it was.
    `progress(done, total)` hears of every code cell run (total: the code cells with a source).
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path)
    try:
        nb = read_notebook(path)
    except ValueError as err:
        return RunResult(path, "invalid", error=str(err))
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    if progress is not None:
        total = sum(c.cell_type == "code" and bool(c.source.strip()) for c in nb.cells)
        done = iter(range(1, total + 1))
        client.on_cell_executed = lambda **_: progress(next(done, total), total)
        progress(0, total)
    start = time.perf_counter()
    status, error, cell, index = "passed", "", "", -1
    # The kernel process's own log (not the cells' output, which travels over ZeroMQ) goes to a file,
    # so that the terminal shows only the table; its tail is reported when the kernel dies.
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as kernel_log:
        try:
            client.execute(stderr=kernel_log)
        except CellExecutionError:
            index, cell, error = _error_cell(nb)
            status, error = "failed", f"cell {index}: {error}"
        except CellTimeoutError as err:
            status = "failed"
            error = f"a cell ran longer than the timeout of {timeout} s: {str(err).splitlines()[0][:200]}"
        except DeadKernelError as err:
            status, error = "failed", f"the kernel died (out of memory?): {err}{_tail(kernel_log)}"
        except Exception as err:  # noqa: BLE001 -- no such kernel, kernel failed to start, ...: a failed run, never a crash
            status, error = "failed", f"could not run the notebook: {type(err).__name__}: {err}{_tail(kernel_log)}"
    seconds = time.perf_counter() - start
    if write and status == "passed":
        nbformat.write(nb, path)
    return RunResult(path, status, seconds, error, cell, index, nb)
