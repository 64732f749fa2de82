"""Run notebooks headless, the way CI and an instructor's pre-workshop check do.

`run_notebook(path)` reads the notebook, executes every cell in a fresh kernel started in the
notebook's folder (nbclient), and returns a `RunResult`: passed or failed, the seconds it took and,
on failure, the failing cell's source and the error. The file is only written with `write=True`
(authors refresh committed outputs that way); a notebook that cannot be read is reported, never
overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunResult", "run_notebook", "find_notebooks"]

NOTEBOOK_SUFFIX = ".ipynb"


@dataclass
class RunResult:
    path: Path
    status: str  # "passed", "failed" (a cell raised or timed out) or "invalid" (not a readable notebook)
    seconds: float = 0.0
    error: str = ""
    cell: str = ""  # source of the failing cell
    notebook: object = None  # the executed nbformat notebook (outputs included), when it ran

    @property
    def ok(self) -> bool:
        return self.status == "passed"


def find_notebooks(paths: list[str] | None, default_dir: Path) -> list[Path]:
    """The notebooks named (files or folders), or every notebook of `default_dir`, sorted."""
    if not paths:
        return sorted(default_dir.glob(f"*{NOTEBOOK_SUFFIX}"))
    found: list[Path] = []
    for p in map(Path, paths):
        found.extend(sorted(p.glob(f"*{NOTEBOOK_SUFFIX}")) if p.is_dir() else [p])
    return found


def _error_cell(nb) -> tuple[int, str, str]:
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return i, cell.source, f"{out.get('ename')}: {out.get('evalue')}"
    return -1, "", ""


def run_notebook(path: str | Path, *, timeout: int = 600, write: bool = False,
                 kernel_name: str = "python3") -> RunResult:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path)
    if path.suffix != NOTEBOOK_SUFFIX:
        return RunResult(path, "invalid", error=f"not a notebook: {path} (expected a {NOTEBOOK_SUFFIX} file)")
    if not path.is_file():
        return RunResult(path, "invalid", error=f"no such notebook: {path}")
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # JSON errors, schema errors, unreadable files: all mean "not a notebook"
        return RunResult(path, "invalid", error=f"cannot read {path} as a notebook: {type(err).__name__}: "
                                                f"{str(err).splitlines()[0][:200]}")
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    start = time.perf_counter()
    status, error, cell = "passed", "", ""
    try:
        client.execute()
    except CellExecutionError:
        index, cell, error = _error_cell(nb)
        status, error = "failed", f"cell {index}: {error}"
    except CellTimeoutError as err:
        status, error = "failed", f"a cell ran longer than {timeout} s: {str(err).splitlines()[0][:200]}"
    except DeadKernelError as err:
        status, error = "failed", f"the kernel died (out of memory?): {err}"
    seconds = time.perf_counter() - start
    if write and status == "passed":
        nbformat.write(nb, path)
    return RunResult(path, status, seconds, error, cell, nb)
