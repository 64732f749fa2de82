"""Learner copies of the notebooks, and checking them.

Convention (every notebook follows it): an exercise is a code cell whose solution lies between a
line `### BEGIN SOLUTION` and a line `### END SOLUTION`; the next cell calls a checker of
`qlearn.check`, which prints one line `[qlearn.check] PASSED|FAILED|NOT ATTEMPTED <number> <title>...`.
The exercise's name in a stub is, in order of preference: the cell's first line when it reads
`# Exercise <number>: <title>`, else the function the solution sits in (`def name(...)`), else the cell.

`build(src_dir, out_dir)` writes learner copies: each solution span becomes
`raise NotImplementedError("Exercise <name>: ...")` at the span's indentation, outputs are cleared.
`check(dir)` runs the notebooks of `dir` and collects every checker line, per notebook.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .check import PREFIX, STATUSES
from .runner import RunResult, find_notebooks, run_notebook

__all__ = ["BEGIN", "END", "strip_solutions", "build", "ExerciseResult", "check_results", "check"]

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
_HEADER = re.compile(r"^#\s*Exercise\s+([^:]+):\s*(.+)$")
_DEF = re.compile(r"^\s*def\s+(\w+)\s*\(")
_LINE = re.compile(re.escape(PREFIX) + r" (" + "|".join(STATUSES) + r") (\S+) ([^:\n]*)(?:: (.*))?$")


def _exercise_name(lines: list[str], begin: int, cell_index: int) -> str:
    first = lines[0].strip() if lines else ""
    if m := _HEADER.match(first):
        return f"Exercise {m.group(1).strip()}: {m.group(2).strip()}"
    for line in reversed(lines[:begin]):
        if m := _DEF.match(line):
            return f"Exercise {m.group(1)}"
    return f"Exercise in cell {cell_index}"


def strip_solutions(source: str, cell_index: int = 0) -> tuple[str, int]:
    """`source` with every solution span replaced by a NotImplementedError stub; (new source, spans)."""
    lines = source.split("\n")
    out, i, spans = [], 0, 0
    while i < len(lines):
        if lines[i].strip() != BEGIN:
            out.append(lines[i])
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == END), None)
        if end is None:
            raise ValueError(f"cell {cell_index}: '{BEGIN}' at line {i + 1} has no matching '{END}'")
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        name = _exercise_name(lines, i, cell_index)
        out.append(f'{indent}raise NotImplementedError("{name}: replace this line with your solution")')
        i, spans = end + 1, spans + 1
    return "\n".join(out), spans


def build(src_dir: Path, out_dir: Path) -> list[tuple[Path, int]]:
    """Write learner copies of every notebook of `src_dir` into `out_dir`; return (path, exercises)."""
    import nbformat

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(src_dir.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        total = 0
        for k, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                cell.source, n = strip_solutions(cell.source, k)
                total += n
                cell.outputs, cell.execution_count = [], None
        target = out_dir / path.name
        nbformat.write(nb, target)
        written.append((target, total))
    return written


@dataclass
class ExerciseResult:
    status: str
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


def check(paths: list[str], timeout: int = 600) -> list[tuple[RunResult, list[ExerciseResult]]]:
    """Run the notebooks (files or folders) and collect their exercise results."""
    runs = []
    for path in find_notebooks(paths, Path(".")):
        run = run_notebook(path, timeout=timeout)
        runs.append((run, check_results(run.notebook) if run.notebook is not None else []))
    return runs
