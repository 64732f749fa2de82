"""The repository keeps its promises: notebook conventions, README <-> CI, Binder <-> pyproject."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from qlearn.course import exercises
from qlearn.course.conventions import (BRANCH, COLAB_CONSTRAINTS, CPU_INDEX, REPO, SETUP_CELL, SETUP_COMMAND,
                                       badges, setup_cell)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FEW_EXERCISES = {"00", "10"}  # notebooks 00 and 10 (the GPU lab) may have fewer than 3 exercises
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}

sys.path.insert(0, str(ROOT / "scripts"))
import make_binder_requirements as mbr  # scripts/ is not a package
import make_colab_constraints as mcc
from make_binder_requirements import tomllib  # the stdlib's, or pip's copy on Python 3.10


def read(path):
    return nbformat.read(path, as_version=4)


def test_every_syllabus_notebook_exists():
    names = [p.name[:2] for p in NOTEBOOKS]
    assert names == [f"{i:02d}" for i in range(12)], f"notebooks present: {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_title_badges_and_the_setup_cell(path):
    nb = read(path)
    first, setup = nb.cells[0], nb.cells[1]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {path.name[:2]} · ")
    assert badges(path.name) in first.source, f"the badges line must be exactly: {badges(path.name)}"
    for heading in ("**What you will learn**", "**Prerequisites**", "**Time**"):
        assert heading in first.source, heading
    assert re.search(r"\*\*Time\*\*: about \d+ s on a laptop CPU / (?:about )?\d+ s on a GPU", first.source), \
        "the time line should read '**Time**: about N s on a laptop CPU / M s on a GPU' with measured numbers"
    assert setup.cell_type == "code" and setup.source == SETUP_CELL, "the setup cell must be qlearn.course.conventions.SETUP_CELL"
    assert nb.metadata.get("kernelspec") == KERNELSPEC


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_ends_with_takeaways_exercises_and_reading(path):
    cells = read(path).cells
    tail = "\n".join(c.source for c in cells[-4:] if c.cell_type == "markdown")
    positions = [tail.find(h) for h in ("Key takeaways", "Exercises", "Further reading")]
    assert -1 not in positions and positions == sorted(positions), \
        "the notebook should end with 'Key takeaways', then 'Exercises', then 'Further reading'"
    assert "](http" in tail[positions[2]:], "further reading should link to papers or docs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_clean_outputs(path):
    code = [c for c in read(path).cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "every code cell should be executed (qlearn run --write)"
    for c in code:
        for out in c.get("outputs", []):
            assert out.get("output_type") != "error", f"a committed error output in {path.name}"
            assert out.get("name") != "stderr", f"stderr output in {path.name}: {out.get('text', '')[:200]}"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "cells should be executed once, top to bottom"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_are_named_stubbable_and_followed_by_a_passing_checker(path):
    nb = read(path)
    number = str(int(path.name[:2]))
    names = exercises.exercise_names(nb)
    for i, name in names.items():
        assert name and name.startswith(f"Exercise {number}."), \
            f"cell {i}: name the exercise in a markdown heading '### Exercise {number}.k: title' just before it"
        nxt = next(c for c in nb.cells[i + 1:] if c.cell_type == "code")
        assert f"qlearn.check.nb{path.name[:2]}." in nxt.source, f"cell {i}: the next code cell should call a checker"
        printed = "".join(o.get("text", "") for o in nxt.get("outputs", []))
        assert f"[qlearn.check] PASSED {name.split()[1].rstrip(':')} " in printed, \
            f"cell {i}: the committed solution should pass its checker"
    _, stubs = exercises.learner_copy(nb, where=path.name)  # raises if a span is malformed or not in a function
    assert stubs >= len(names)
    assert len(names) >= (1 if path.name[:2] in FEW_EXERCISES else 3), f"{path.name} has {len(names)} exercises"


def readme_commands() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.DOTALL).group(1)
    setup, test = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    return setup, test


def test_readme_has_exactly_two_commands_and_ci_runs_them_verbatim():
    setup, test = readme_commands()
    install, opens = setup.split(" && ")
    assert opens == "qlearn lab" and install == SETUP_COMMAND  # the one the doctor's fixes give too
    assert f"--extra-index-url {CPU_INDEX}" in install  # the CPU build on every platform, no CUDA download
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci, "the README's set-up (without '&& qlearn lab') and test commands"
    assert ci.index(install) < ci.index(test)
    assert "set -euo pipefail" in ci  # a failing test command fails CI
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
    # CI's only step before the README's: torch from the local CPU wheel, the build the README's index gives
    before = [ln for ln in ci[:ci.index(install)] if ln.startswith("pip install")]
    assert before == ["pip install -q torch==2.13.0"] and mbr.pins()["torch"] == "2.13.0"


def test_readme_syllabus_gives_every_notebook_its_measured_cpu_time():
    text = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        time = re.search(r"\*\*Time\*\*: about (\d+) s on a laptop CPU", read(path).cells[0].source)
        assert time, f"{path.name}: no '**Time**: about N s on a laptop CPU' line in its first cell"
        row = next((ln for ln in text.splitlines() if f"(notebooks/{path.name})" in ln and ln.startswith("|")), None)
        assert row, f"README's syllabus has no row for {path.name}"
        assert f"| {time.group(1)} s |" in row, f"README's row for {path.name} differs from its first cell: {time.group(1)} s"


def test_readme_badges_point_at_the_first_notebook():
    assert badges("00_start_here.ipynb") in (ROOT / "README.md").read_text()
    assert f"https://github.com/{REPO}" in SETUP_CELL and f'"--branch", "{BRANCH}"' in SETUP_CELL


def test_the_colab_setup_installs_with_the_colab_constraints_not_unpinned():
    assert f'"-c", "qlearn-course/{COLAB_CONSTRAINTS}", "-e", "qlearn-course"' in SETUP_CELL
    assert SETUP_CELL.count('"pip", "install"') == 1


def test_colab_constraints_pin_the_course_libraries_and_leave_colabs_torch():
    text = (ROOT / COLAB_CONSTRAINTS).read_text()
    assert text == mcc.render(), "constraints-colab.txt is stale: python scripts/make_colab_constraints.py"
    pins = mbr.pins()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    got = dict(ln.split("==") for ln in lines)
    assert all(pins[name] == version for name, version in got.items()), "a pin differs from constraints.txt"
    assert {"torch", "torchao", "numpy", "ipykernel"}.isdisjoint(got)  # Colab's own, kept
    assert {"transformers", "peft", "bitsandbytes", "accelerate"} <= got.keys()
    # every dependency is either pinned for Colab or left to Colab on purpose (with a reason)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name in map(mbr.name_of, project["dependencies"]):
        assert (name in got) != (name in mcc.COLAB_KEEPS), f"{name}: pin it for Colab or say why Colab keeps its own"


def test_set_repo_points_a_copy_of_the_course_at_a_fork(tmp_path):
    for part in ("notebooks", "docs"):
        shutil.copytree(ROOT / part, tmp_path / part)
    (tmp_path / "qlearn" / "course").mkdir(parents=True)
    shutil.copy(ROOT / "qlearn" / "course" / "conventions.py", tmp_path / "qlearn" / "course")
    shutil.copy(ROOT / "README.md", tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "set_repo.py"), "alice/qlearn-fork", "--branch",
                          "spring", "--root", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("course repository: alice/qlearn-fork (branch spring);")
    assert 'REPO = "alice/qlearn-fork"' in (tmp_path / "qlearn" / "course" / "conventions.py").read_text()
    for path in sorted((tmp_path / "notebooks").glob("*.ipynb")):
        nb = read(path)
        assert badges(path.name, "alice/qlearn-fork", "spring") in nb.cells[0].source
        assert nb.cells[1].source == setup_cell("alice/qlearn-fork", "spring")
        assert nb.cells[1].outputs == read(ROOT / "notebooks" / path.name).cells[1].outputs  # nothing re-run
        assert REPO not in path.read_text()
    readme = (tmp_path / "README.md").read_text()
    assert badges("00_start_here.ipynb", "alice/qlearn-fork", "spring") in readme and REPO not in readme
    assert f"github.com/{REPO}" not in (tmp_path / "docs" / "instructor.md").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "set_repo.py"), "not a repo", "--root", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode != 0 and "repo must be OWNER/NAME" in bad.stderr


def test_binder_requirements_are_pyproject_pinned_by_constraints():
    text = (ROOT / "binder" / "requirements.txt").read_text()
    assert text == mbr.render(), "binder/requirements.txt is stale: python scripts/make_binder_requirements.py"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = mbr.pins()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith(("#", "-"))]
    wanted = project["dependencies"] + project["optional-dependencies"]["lab"]
    assert sorted(ln.split("==")[0] for ln in lines) == sorted(mbr.name_of(d) for d in wanted)
    for line in lines:
        name, version = line.split("==")
        assert version.removesuffix("+cpu") == pins[name], f"{line} vs constraints.txt {name}=={pins[name]}"
    assert "torch==" + pins["torch"] + "+cpu" in lines  # Binder has no GPU: the CPU build, no CUDA libraries


def test_binder_installs_qlearn_and_opens_lab():
    post = ROOT / "binder" / "postBuild"
    assert os.access(post, os.X_OK) and "pip install --no-deps -e ." in post.read_text()
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert re.fullmatch(r"python-3\.\d+", runtime) and int(runtime.split(".")[1]) >= int(floor.split(".")[1])
    assert "urlpath=lab/tree/notebooks/00_start_here.ipynb" in badges("00_start_here.ipynb")


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = mbr.pins()
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    for req in map(Requirement, reqs):
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), f"{name}=={pins[name]} vs {req}"


def test_sanitizers_mask_what_varies_and_nothing_else():
    from nbval.plugin import get_sanitize_patterns

    patterns = get_sanitize_patterns((ROOT / "tests" / "sanitize.cfg").read_text())

    def clean(s):
        for regex, replace in patterns:
            s = re.sub(regex, replace, s)
        return s

    assert clean("<function f at 0x7f3a2b1c>") == "<function f at 0xADDRESS>"
    assert clean("step 1.23 s, 45.6 ms, 7.8 \u00b5s, 2.0 min") == "step TIME, TIME, TIME, TIME"
    assert clean("saved to /tmp/tmpab12/x.bin") == "saved to TMPPATH"
    assert clean("100%|██████████| 10/10 [00:01<00:00,  9.51it/s]") == "PROGRESS"
    kept = "0x3F800000 = 1.0; 4 bits; 7 steps; ppl 12.5 smoothed; 28.0 GB; 3.5 GB"
    assert clean(kept) == kept  # numbers the notebooks assert stay compared


@pytest.mark.slow
def test_binder_requirements_resolve(tmp_path):
    """Resolve binder/requirements.txt with pip (a dry run, nothing installed; ~20-60 s).

    The PyTorch CPU index cannot be reached from this machine (only PyPI), so its line is left out and
    torch==2.13.0+cpu is resolved from pip's configured find-links (the CPU wheel on disk), else
    as torch==2.13.0 from PyPI. The file keeps its place beside constraints.txt, so `-c ../constraints.txt`
    is resolved as Binder resolves it."""
    (tmp_path / "binder").mkdir()
    shutil.copy(ROOT / "constraints.txt", tmp_path / "constraints.txt")
    text = (ROOT / "binder" / "requirements.txt").read_text()
    text = text.replace("--extra-index-url https://download.pytorch.org/whl/cpu\n", "")
    local = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                           capture_output=True, text=True, check=False).stdout.split()
    if not any(Path(d).is_dir() and any(Path(d).glob("torch-*+cpu-*.whl")) for d in local):
        text = text.replace("+cpu", "")
    req = tmp_path / "binder" / "requirements.txt"
    req.write_text(text)
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(tmp_path / "report.json"), "-r", str(req)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=500, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not reach a package index within 500 s")
    unreachable = ("Could not fetch URL", "NewConnectionError", "Temporary failure in name resolution")
    if out.returncode != 0 and any(s in out.stderr for s in unreachable):
        pytest.skip("no package index reachable: " + out.stderr.strip().splitlines()[-1])
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    installed = {p["metadata"]["name"].lower(): p["metadata"]["version"]
                 for p in json.loads((tmp_path / "report.json").read_text())["install"]}
    pins = mbr.pins()
    for name, version in installed.items():
        name = name.replace("_", "-")
        if name in pins:  # everything pinned resolves to its pin (constraints apply to dependencies too)
            assert version.split("+")[0] == pins[name], f"{name} resolved to {version}, pinned {pins[name]}"
    assert installed["torch"].startswith(pins["torch"])
