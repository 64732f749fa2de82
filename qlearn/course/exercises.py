"""Learner copies of the notebooks (solutions replaced by stubs), and checking them.

The convention every course notebook follows (tests/test_repo.py checks it):

    ### Exercise 2.1: symmetric scale            <- a markdown cell before the exercise names it
    ...the task...

    def symmetric_scale(x, bits):                 <- the exercise cell: signature, docstring, and
        \"\"\"absmax / (2**(bits-1) - 1).\"\"\"        the solution between the two marker lines,
        ### BEGIN SOLUTION                           always inside a function body, so that the stub
        return x.abs().max() / (2 ** (bits - 1) - 1)  raises only when the checker calls it
        ### END SOLUTION

    qlearn.check.nb02.symmetric_scale(symmetric_scale)   <- the next code cell calls the checker

The exercise's name comes from, in order: the code cell's first line `# Exercise <N.k>: <title>`,
else the nearest markdown heading `Exercise <N.k>: <title>` between the previous code cell and this
one, else the function the solution sits in (`Exercise <function>`).

`build(notebooks, out_dir)` writes learner copies: each solution span becomes
`raise NotImplementedError("Exercise <N.k>: <title>")` at the span's indentation, and every output
and execution count is cleared. `check(paths)` runs notebooks and collects, per notebook, every line
`[qlearn.check] PASSED|FAILED|NOT ATTEMPTED <N.k> <title>[: message]` that the checkers print.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..check import PREFIX, STATUSES
from .runner import RunResult, find_notebooks, read_notebook, run_notebook

__all__ = ["BEGIN", "END", "ExerciseResult", "build", "check", "check_results", "exercise_names",
           "strip_solutions"]

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
_NAME = r"Exercise\s+(\d+(?:\.\d+)*)\s*[:.]\s*(.+?)\s*$"
_HEADER = re.compile(r"^#\s*" + _NAME)  # first line of a code cell: "# Exercise 2.1: symmetric scale"
_HEADING = re.compile(r"^#+\s*" + _NAME)  # a markdown heading: "### Exercise 2.1: symmetric scale"
_DEF = re.compile(r"^\s*def\s+(\w+)\s*\(")
_LINE = re.compile(re.escape(PREFIX) + r" (" + "|".join(STATUSES) + r") (\S+) ([^:\n]*)(?:: (.*))?$")


def _heading(markdown: str) -> str | None:
    for line in markdown.splitlines():
        if m := _HEADING.match(line.strip()):
            return f"Exercise {m.group(1)}: {m.group(2)}"
    return None


def exercise_names(nb) -> dict[int, str | None]:
    """{index of each code cell holding a solution: the name its markdown or first line gives, or None}."""
    names, heading = {}, None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            heading = _heading(cell.source) or heading
        elif cell.cell_type == "code":
            if BEGIN in cell.source:
                first = cell.source.split("\n", 1)[0].strip()
                m = _HEADER.match(first)
                names[i] = f"Exercise {m.group(1)}: {m.group(2)}" if m else heading
            heading = None  # a heading names only the code cell right after it
    return names


def strip_solutions(source: str, name: str | None = None, where: str = "the cell") -> tuple[str, int]:
    """`source` with every solution span replaced by a NotImplementedError stub; (new source, spans).

    `name` is the exercise's name (see the module docstring); without it the first line
    `# Exercise N.k: title` or the enclosing function names the stub. `where` names the cell in errors.
    """
    lines = source.split("\n")
    if name is None and (m := _HEADER.match(lines[0].strip())):
        name = f"Exercise {m.group(1)}: {m.group(2)}"
    out, i, spans = [], 0, 0
    while i < len(lines):
        if lines[i].strip() == END:
            raise ValueError(f"{where}: '{END}' at line {i + 1} has no '{BEGIN}' before it")
        if lines[i].strip() != BEGIN:
            out.append(lines[i])
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() in (BEGIN, END)), None)
        if end is None or lines[end].strip() != END:
            raise ValueError(f"{where}: '{BEGIN}' at line {i + 1} has no matching '{END}'")
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        if not indent:
            raise ValueError(f"{where}: the solution at line {i + 1} is not inside a function body; put it "
                             "in a function so that its stub raises only when the checker calls it")
        label = name
        if label is None:
            fn = next((m.group(1) for line in reversed(lines[:i]) if (m := _DEF.match(line))), None)
            label = f"Exercise {fn}" if fn else "Exercise"
        out.append(f"{indent}raise NotImplementedError({json.dumps(label, ensure_ascii=False)})")
        i, spans = end + 1, spans + 1
    return "\n".join(out), spans


def learner_copy(nb, where: str = "notebook"):
    """The notebook `nb` (modified in place) with solutions stubbed, outputs cleared; (nb, exercises)."""
    names = exercise_names(nb)
    total = 0
    for k, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cell.source, n = strip_solutions(cell.source, names.get(k), where=f"{where}, cell {k}")
        total += n
        cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)  # nbclient's timings
    return nb, total


def build(notebooks: list[Path], out_dir: Path) -> list[tuple[Path, int]]:
    """Write learner copies of `notebooks` into `out_dir`; return [(written path, exercises)].

    Every notebook is read and stubbed before anything is written, so a bad notebook leaves `out_dir`
    untouched; `out_dir` may not be a folder a notebook comes from (the solutions would be lost).
    """
    import nbformat

    out_dir = Path(out_dir)
    copies = []
    for path in map(Path, notebooks):
        if path.parent.resolve() == out_dir.resolve():
            raise ValueError(f"--out {out_dir} is the folder of {path}: the learner copy would overwrite "
                             "the solutions; choose another folder")
        copies.append((path, *learner_copy(read_notebook(path), where=str(path))))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, nb, total in copies:
        nbformat.write(nb, out_dir / path.name)
        written.append((out_dir / path.name, total))
    return written


@dataclass
class ExerciseResult:
    status: str  # one of qlearn.check.STATUSES
    number: str
    title: str
    message: str = ""


def check_results(nb) -> list[ExerciseResult]:
    """Every checker line printed in an executed notebook's outputs, in order."""
    results = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            for line in text.splitlines():
                if m := _LINE.match(line):
                    results.append(ExerciseResult(m.group(1), m.group(2), m.group(3).strip(), m.group(4) or ""))
    return results


def check(paths: list[str | Path], timeout: int = 600,
          run: Callable[..., RunResult] = run_notebook) -> list[tuple[RunResult, list[ExerciseResult]]]:
    """Run the notebooks (files or folders) and collect their exercise results. `run(path, timeout=)`
    executes one notebook (the CLI passes run_notebook with a progress bar)."""
    runs = []
    for path in find_notebooks([str(p) for p in paths], Path(".")):
        result = run(path, timeout=timeout)
        runs.append((result, check_results(result.notebook) if result.notebook is not None else []))
    return runs
