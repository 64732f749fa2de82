"""The instructor guide keeps its promises: its plans come from the one timing table and fit their
length, no plan shows a notebook before its prerequisites, every notebook has a slot, and every open
exercise (the lists at the end of the notebooks) has an answer in docs/answers.md, which learners'
copies do not carry."""

import re
import sys
from pathlib import Path

import nbformat
import pytest

from qlearn.course import exercises

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import instructor_plans as ip  # scripts/ is not a package

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ANSWERS = ROOT / "docs" / "answers.md"


def test_the_guide_shows_the_table_and_plans_the_script_makes():
    text = (ROOT / "docs" / "instructor.md").read_text()
    shown = text[text.index(ip.BEGIN):text.index(ip.END) + len(ip.END)]
    assert shown == ip.render(), "docs/instructor.md is stale: python scripts/instructor_plans.py"


@pytest.mark.parametrize("name", list(ip.PLANS))
def test_every_plan_fits_its_length(name):
    plan = ip.PLANS[name]
    end = ip.plan_rows(plan["steps"], ip.notebooks())[-1][1]
    assert end <= plan["minutes"], f"{name}: {end} minutes planned for {plan['minutes']}"


@pytest.mark.parametrize("name", list(ip.PLANS))
def test_no_plan_shows_a_notebook_before_its_prerequisites(name):
    found = ip.notebooks()
    seen = set()
    for nb in ip.plan_notebooks(name, found):
        missing = [p for p in nb.prerequisites if p not in seen]
        assert not missing, f"{name}: notebook {nb.number} ({nb.slug}) comes before its prerequisites {missing}"
        seen.add(nb.number)


def test_every_notebook_has_a_slot_in_some_plan():
    found = ip.notebooks()
    placed = {nb.slug for name in ip.PLANS for nb in ip.plan_notebooks(name, found)}
    unplaced = [nb.slug for nb in found if nb.slug not in placed]
    assert not unplaced, f"give these notebooks a slot in scripts/instructor_plans.py's PLANS: {unplaced}"


def test_the_minutes_follow_the_stated_formula():
    nb = ip.Notebook("07", "qlora", "QLoRA", cpu_s=90, words=2429, exercises=3, prerequisites=("03", "06"))
    # 5 + 2429/100 + 6*3 + 1.5 = 48.8 -> 50; 5 + 2429/600 + 1.5 = 10.55 -> 15
    assert nb.minutes == {"teach": 50, "demo": 15}


def open_exercises(path: Path) -> list[int]:
    """The numbers of the open exercises at the end of a notebook: its last "## Exercises" list,
    without the item that points at the checked exercises above."""
    nb = nbformat.read(path, as_version=4)
    tail = next(c.source for c in reversed(nb.cells) if c.cell_type == "markdown" and "## Exercises" in c.source)
    block = tail[tail.index("## Exercises"):].split("\n## ", 1)[0]
    items = re.findall(r"^(\d+|-)\.?\s+(.*)$", block, re.MULTILINE)
    numbers = [int(n) if n != "-" else k for k, (n, _) in enumerate(items, 1)]
    return [n for n, (_, text) in zip(numbers, items) if not re.search(r"\babove\b", text)]


def answer_keys() -> dict[str, set[int]]:
    """{notebook slug: the exercise numbers docs/answers.md answers}, from its "### slug N" headings."""
    keys: dict[str, set[int]] = {}
    for slug, number in re.findall(r"^### ([a-z0-9_]+) (\d+)\b", ANSWERS.read_text(), re.MULTILINE):
        keys.setdefault(slug, set()).add(int(number))
    return keys


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_open_exercise_has_an_answer(path):
    slug = path.stem.split("_", 1)[1]
    wanted = open_exercises(path)
    assert wanted, f"{path.name}: no open exercises found at its end"
    missing = sorted(set(wanted) - answer_keys().get(slug, set()))
    assert not missing, f"docs/answers.md has no '### {slug} N' answer for exercises {missing} of {path.name}"


def test_learner_copies_do_not_carry_the_answer_key(tmp_path):
    [(copy, _)] = exercises.build([NOTEBOOKS[0]], tmp_path / "learner")
    assert [p.name for p in (tmp_path / "learner").iterdir()] == [NOTEBOOKS[0].name]  # only the notebook
    first_answer = ANSWERS.read_text().split("### ", 2)[1].split("\n", 1)[1].strip().splitlines()[0]
    assert first_answer not in copy.read_text()
