"""What every course notebook has in common, defined once: the badges line, the setup cell, and the
one place that says where the course lives (REPO, BRANCH) and how it is installed.

A fork or a course host points the course at itself with

    python scripts/set_repo.py OWNER/NAME [--branch BRANCH]

which rewrites REPO and BRANCH below, then the badges line and the setup cell of every notebook and
the repository links of README.md and docs/ (`sync_notebook` is the notebook part).
tests/test_repo.py checks every notebook against these, so the Colab/Binder links all point at the
configured repository and every notebook starts the same way.
"""

from __future__ import annotations

import re

__all__ = ["BADGES", "BRANCH", "COLAB_CONSTRAINTS", "CPU_INDEX", "REPO", "SETUP_CELL", "SETUP_COMMAND",
           "badges", "setup_cell", "sync_notebook"]

REPO = "qlearn-course/qlearn"  # the GitHub repository the badges and the Colab set-up fetch from
BRANCH = "main"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # PyTorch's CPU-only builds (no CUDA libraries)
# The README's set-up. With PyTorch's CPU index beside PyPI, pip takes torch 2.13.0+cpu (a local
# version sorts above the plain 2.13.0 that PyPI has), so no platform downloads the CUDA build.
SETUP_COMMAND = f'pip install -c constraints.txt -e ".[test,lab]" --extra-index-url {CPU_INDEX}'
# Colab's pins: the course's libraries at constraints.txt's versions, not torch (Colab's CUDA build)
# nor torchao (built for one torch release); made by scripts/make_colab_constraints.py.
COLAB_CONSTRAINTS = "constraints-colab.txt"
# The badges line as any repository writes it (set_repo.py replaces the old one with it).
BADGES = re.compile(r"\[!\[Open in Colab\]\([^)]*\)\]\([^)]*\) \[!\[Binder\]\([^)]*\)\]\([^)]*\)")


def badges(notebook: str, repo: str = REPO, branch: str = BRANCH) -> str:
    """The "Open in Colab" and Binder badges of notebooks/<notebook>, as one markdown line."""
    colab = f"https://colab.research.google.com/github/{repo}/blob/{branch}/notebooks/{notebook}"
    binder = f"https://mybinder.org/v2/gh/{repo}/{branch}?urlpath=lab/tree/notebooks/{notebook}"
    return (f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab}) "
            f"[![Binder](https://mybinder.org/badge_logo.svg)]({binder})")


def setup_cell(repo: str = REPO, branch: str = BRANCH) -> str:
    """The first code cell of every notebook (Colab installs the course from `repo` at `branch`)."""
    return f'''# NBVAL_IGNORE_OUTPUT
# Setup, the same in every notebook: on Colab (or wherever qlearn is missing) fetch the course and
# install it with the course's tested versions of its libraries ({COLAB_CONSTRAINTS}; the torch
# already installed stays); then seed everything and pick the device (a CUDA GPU if any, else the CPU).
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("qlearn") is None:
    subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", "{branch}", "https://github.com/{repo}", "qlearn-course"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", "qlearn-course/{COLAB_CONSTRAINTS}", "-e", "qlearn-course"], check=True)
    sys.path.insert(0, os.path.abspath("qlearn-course"))
import qlearn

qlearn.seed_everything(0)
DEVICE = qlearn.get_device()
MODEL = os.environ.get("QLEARN_MODEL", "tiny")  # "tiny" is the embedded model; on a GPU try a hub id
print(f"qlearn {{qlearn.__version__}}, torch {{qlearn.environment_report().torch}}, device: {{DEVICE}}")
assert DEVICE.type in ("cpu", "cuda")'''


SETUP_CELL = setup_cell()


def sync_notebook(nb, name: str, repo: str = REPO, branch: str = BRANCH) -> bool:
    """Give the notebook `nb` (nbformat v4, file name `name`) the badges line and setup cell of
    `repo`/`branch`, in place: cell 0's badges line, cell 1's source (its output is
    NBVAL_IGNORE_OUTPUT, so nothing needs re-running). True when something changed."""
    first, setup = nb.cells[0], nb.cells[1]
    if first.cell_type != "markdown" or not BADGES.search(first.source):
        raise ValueError(f"{name}: cell 0 should be markdown holding the badges line {badges(name, repo, branch)}")
    if setup.cell_type != "code":
        raise ValueError(f"{name}: cell 1 should be the setup code cell")
    before = (first.source, setup.source)
    first.source = BADGES.sub(lambda _: badges(name, repo, branch), first.source, count=1)
    setup.source = setup_cell(repo, branch)
    return (first.source, setup.source) != before
