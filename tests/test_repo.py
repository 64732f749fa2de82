"""The repository keeps its promises: notebook conventions, README <-> CI, Binder <-> pyproject."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

from qlearn.conventions import SETUP_CELL, badges
from qlearn.exercises import BEGIN, END

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FEW_EXERCISES = {"00_start_here.ipynb", "09_gpu_lab.ipynb"}  # may have fewer than 3


def test_every_syllabus_notebook_exists():
    names = [p.name[:2] for p in NOTEBOOKS]
    assert names == [f"{i:02d}" for i in range(10)], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_the_conventions(path):
    nb = nbformat.read(path, as_version=4)
    first, setup = nb.cells[0], nb.cells[1]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {path.name[:2]} ")
    assert badges(path.name) in first.source, "the badges line must link to this notebook"
    for heading in ("What you will learn", "Prerequisites", "Time"):
        assert heading in first.source, heading
    assert setup.cell_type == "code" and setup.source.strip() == SETUP_CELL
    tail = "\n".join(c.source for c in nb.cells[-4:] if c.cell_type == "markdown")
    for heading in ("Key takeaways", "Exercises", "Further reading"):
        assert heading in tail, f"the notebook should end with '{heading}'"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("outputs") is not None for c in code)
    assert any(c.get("outputs") for c in code[2:]), "notebooks are committed with their outputs"
    for c in code:
        for out in c.get("outputs", []):
            assert out.get("output_type") != "error", f"a committed error output in {path.name}"
            assert out.get("name") != "stderr", f"stderr output in {path.name}: {out.get('text', '')[:200]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_have_markers_and_a_checker(path):
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    count = 0
    for i, cell in enumerate(cells):
        if cell.cell_type == "code" and BEGIN in cell.source:
            count += 1
            assert cell.source.count(BEGIN) == cell.source.count(END)
            nxt = next(c for c in cells[i + 1:] if c.cell_type == "code")
            assert "qlearn.check." in nxt.source, f"the cell after an exercise should call a checker ({path.name})"
            assert "[qlearn.check] PASSED" in "".join(o.get("text", "") for o in nxt.get("outputs", [])), \
                f"the committed solution should pass its checker ({path.name})"
    assert count >= (1 if path.name in FEW_EXERCISES else 3), f"{path.name} has {count} exercises"


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    setup, test = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    return setup, test


def test_ci_runs_the_readme_commands():
    setup, test = readme_commands()
    install = setup.split(" && ")[0]  # "... && qlearn lab" opens the course; CI only installs
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci
    assert "set -euo pipefail" in ci  # a failing test command fails CI
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_binder_requirements_are_generated_from_pyproject_and_constraints():
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_binder_requirements as mbr

    assert (ROOT / "binder" / "requirements.txt").read_text() == mbr.render(), \
        "binder/requirements.txt is stale: python scripts/make_binder_requirements.py"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {mbr.name_of(d) for d in deps} <= {line.split("==")[0] for line in mbr.requirements()}


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    from packaging.requirements import Requirement
    from packaging.version import Version

    sys.path.insert(0, str(ROOT / "scripts"))
    import make_binder_requirements as mbr

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = mbr.pins()
    reqs = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    for req in map(Requirement, reqs):
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), f"{name}=={pins[name]} vs {req}"


@pytest.mark.slow
def test_binder_requirements_resolve(tmp_path):
    """Resolve binder/requirements.txt with pip (no install). PyTorch's CPU index cannot be reached
    from CI, so the torch line is resolved as the same version from the default index instead."""
    text = (ROOT / "binder" / "requirements.txt").read_text()
    text = text.replace("--extra-index-url https://download.pytorch.org/whl/cpu\n", "")
    text = text.replace("-c ../constraints.txt", f"-c {ROOT / 'constraints.txt'}").replace("+cpu", "")
    req = tmp_path / "requirements.txt"
    req.write_text(text)
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                              "--quiet", "--report", str(tmp_path / "r.json"), "-r", str(req)],
                             capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not reach a package index within 300 s")
    if "Could not fetch URL" in out.stderr or "NewConnectionError" in out.stderr:
        pytest.skip("no package index reachable: " + out.stderr.splitlines()[-1])
    assert out.returncode == 0, out.stderr[-2000:]
