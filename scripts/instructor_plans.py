"""The instructor guide's timings from one table: each notebook's class minutes, measured from the
notebooks themselves, and the session plans built from those minutes.

    python scripts/instructor_plans.py      # rewrite the table and the plans in docs/instructor.md

Step 1 (measure) each notebooks/NN_slug.ipynb: its CPU seconds (the **Time** line, measured with
        `qlearn run`), its words of prose, its checked exercises, its prerequisites (the notebook
        numbers on its **Prerequisites** line).
Step 2 (minutes) teach = INTRO + words / READ_WPM + EXERCISE_MIN x exercises + CPU seconds / 60
                 demo  = INTRO + words / SKIM_WPM + CPU seconds / 60
        each rounded up to 5 minutes; MEASURED_IN_CLASS (by slug) replaces a row with what a class
        really took: the one place to write down a workshop's timings.
Step 3 (plans) each of PLANS is a list of steps in order: (notebook, "teach" | "demo"), or (label,
        minutes) for a break or a wrap-up. A notebook is named by its slug, or by a pattern for one not
        written yet (NEW): its slot keeps its place with NEW_MINUTES and is marked "new" until the
        notebook exists, then its measured row is used.
Step 4 (write) the table and the plans replace the text between the markers in docs/instructor.md.
tests/test_instructor.py checks that the guide is up to date, that every plan fits its length, and
that every notebook's prerequisites come earlier in every plan that has it.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "instructor.md"
BEGIN, END = "<!-- plans: made by scripts/instructor_plans.py, do not edit -->", "<!-- plans: end -->"

INTRO = 5  # minutes: the instructor introduces the notebook, learners open it
READ_WPM = 100  # words a minute, read with the code beside them (technical prose with formulas)
SKIM_WPM = 600  # words a minute, the instructor skimming the prose on the projector
EXERCISE_MIN = 6  # minutes a checked exercise takes, with its hint
MEASURED_IN_CLASS: dict[str, dict[str, int]] = {}  # e.g. {"qlora": {"teach": 60}} after a workshop
NEW: dict[str, str] = {}  # notebooks being written: a pattern their slug will match -> what they cover
NEW_MINUTES = {"teach": 50, "demo": 10}

# Each plan: its length in minutes, the plan it follows on (whose notebooks count as seen), and its
# steps: (slug or NEW pattern, "teach" | "demo"), or (label, minutes) for a break or a wrap-up.
PLANS = {
    "90 minutes: quantization, hands-on": {"minutes": 90, "after": None, "steps": [
        ("start_here", "demo"), ("number_formats", "demo"), ("linear_quantization", "demo"),
        ("post_training_quantization", "demo"),
        ("hands-on: the checked exercises of notebook 02 (2.1-2.4), hints on", 30),
        ("wrap-up: the memory ledger of 00 again, which term each format shrinks", 5)]},
    "90 minutes: from a float to QLoRA, shown": {"minutes": 90, "after": None, "steps": [
        ("start_here", "demo"), ("number_formats", "demo"), ("linear_quantization", "demo"),
        ("post_training_quantization", "demo"), ("fine_tuning_regimes", "demo"), ("qlora", "demo"),
        ("questions", 5)]},
    "half day A (3.5 h): quantization": {"minutes": 210, "after": None, "steps": [
        ("start_here", "demo"), ("number_formats", "demo"), ("linear_quantization", "teach"), ("break", 10),
        ("post_training_quantization", "teach"), ("outlier_features", "demo"), ("quantization_aware_training", "demo"),
        ("wrap-up: which method for which bit width, and why outliers decide it", 10)]},
    "half day B (3.5 h): fine-tuning": {"minutes": 210, "after": None, "steps": [
        ("start_here", "demo"), ("number_formats", "demo"), ("linear_quantization", "demo"),
        ("post_training_quantization", "demo"), ("fine_tuning_regimes", "demo"), ("qlora", "teach"), ("break", 10),
        ("merging", "demo"), ("outlier_features", "demo"), ("format_landscape", "demo"), ("questions", 15)]},
    "after half day B, on a GPU (1 h)": {"minutes": 60, "after": "half day B (3.5 h): fine-tuning", "steps": [
        ("gpu_lab", "demo"), ("beyond_one_gpu", "demo"),
        ("hands-on: notebook 10's exercises and the kernels section live on the GPU", 25), ("questions", 10)]},
}


@dataclass
class Notebook:
    number: str
    slug: str
    title: str
    cpu_s: int
    words: int
    exercises: int
    prerequisites: tuple[str, ...]  # notebook numbers

    @property
    def minutes(self) -> dict[str, int]:
        up = lambda m: 5 * math.ceil(m / 5)
        measured = {"teach": up(INTRO + self.words / READ_WPM + EXERCISE_MIN * self.exercises + self.cpu_s / 60),
                    "demo": up(INTRO + self.words / SKIM_WPM + self.cpu_s / 60)}
        return measured | MEASURED_IN_CLASS.get(self.slug, {})


def measure(path: Path) -> Notebook:
    """Step 1 for one notebook."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    text = lambda c: "".join(c["source"])
    head = text(cells[0])
    time = re.search(r"\*\*Time\*\*: about (\d+) s on a laptop CPU", head)
    pre = re.search(r"\*\*Prerequisites\*\*:(.*?)(?:\n\n|$)", head, re.DOTALL)
    if time is None:
        raise SystemExit(f"{path.name}: no '**Time**: about N s on a laptop CPU' line in its first cell "
                         "(time it with `qlearn run` and write the seconds there)")
    number, slug = path.stem.split("_", 1)
    return Notebook(number, slug, head.splitlines()[0].lstrip("# ").split(" · ", 1)[-1], int(time.group(1)),
                    sum(len(text(c).split()) for c in cells if c["cell_type"] == "markdown"),
                    sum("### BEGIN SOLUTION" in text(c) for c in cells if c["cell_type"] == "code"),
                    tuple(sorted(set(re.findall(r"\b(\d\d)\b", pre.group(1))) - {number})) if pre else ())


def notebooks(root: Path = ROOT) -> list[Notebook]:
    return [measure(p) for p in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))]


def _find(key: str, found: list[Notebook]) -> Notebook | None:
    exact = [n for n in found if n.slug == key]
    if exact or key not in NEW:
        return exact[0] if exact else None
    return next((n for n in found if re.search(key, n.slug)), None)


def plan_notebooks(name: str, found: list[Notebook]) -> list[Notebook]:
    """The notebooks a plan shows, in order, after those of the plans it follows on from."""
    plan = PLANS[name]
    before = plan_notebooks(plan["after"], found) if plan["after"] else []
    return before + [nb for key, how in plan["steps"] if not isinstance(how, int) and (nb := _find(key, found))]


def plan_rows(steps, found: list[Notebook]) -> list[tuple[int, int, str, str]]:
    """Step 3: (start, end, what, mode) for each step of a plan, in minutes from the start."""
    rows, t = [], 0
    for key, how in steps:
        if isinstance(how, int):
            rows.append((t, t + how, key, ""))
            t += how
            continue
        nb = _find(key, found)
        if nb is None and key not in NEW:
            raise SystemExit(f"plan step {key!r}: no notebooks/NN_{key}.ipynb (rename the step, or add it to NEW)")
        minutes = nb.minutes[how] if nb else NEW_MINUTES[how]
        what = f"{nb.number} {nb.title}" if nb else f"new: {NEW[key]}, slot reserved ({how} {minutes} min)"
        rows.append((t, t + minutes, what, how if nb else "new"))
        t += minutes
    return rows


def _clock(m: int) -> str:
    return f"{m // 60}:{m % 60:02d}"


def render(root: Path = ROOT) -> str:
    """Step 4's text: the table, then every plan."""
    found = notebooks(root)
    lines = [BEGIN, "", "| notebook | CPU run (s) | words | checked exercises | prerequisites | teach (min) | demo (min) |",
             "|---|---|---|---|---|---|---|"]
    for nb in found:
        m = nb.minutes
        flag = " (measured in class)" if nb.slug in MEASURED_IN_CLASS else ""
        lines.append(f"| {nb.number} {nb.title} | {nb.cpu_s} | {nb.words} | {nb.exercises} | "
                     f"{', '.join(nb.prerequisites) or '-'} | {m['teach']}{flag} | {m['demo']} |")
    for name, plan in PLANS.items():
        rows = plan_rows(plan["steps"], found)
        after = f" It follows on from *{plan['after']}*." if plan["after"] else ""
        lines += ["", f"### {name}", "", "| time | notebook | how |", "|---|---|---|"]
        lines += [f"| {_clock(a)}-{_clock(b)} | {what} | {how or '-'} |" for a, b, what, how in rows]
        lines.append(f"\n{rows[-1][1]} of {plan['minutes']} minutes.{after}")
    return "\n".join([*lines, "", END])


def write(root: Path = ROOT) -> bool:
    text = GUIDE.read_text() if root == ROOT else (root / "docs" / "instructor.md").read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + render(root) + text[end:]
    (root / "docs" / "instructor.md").write_text(new)
    return new != text


if __name__ == "__main__":
    changed = write()
    print(f"docs/instructor.md: plans {'rewritten' if changed else 'already up to date'}")
    sys.exit(0)
