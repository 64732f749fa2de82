"""What every course notebook has in common, defined once: the badges line and the setup cell.

tests/test_repo.py checks each notebook against these, so the Colab/Binder links all point at the
one configured repository (REPO) and every notebook starts the same way.
"""

from __future__ import annotations

REPO = "qlearn-course/qlearn"  # the GitHub repository the badges and the Colab set-up fetch from
BRANCH = "main"


def badges(notebook: str) -> str:
    """The "Open in Colab" and Binder badges of notebooks/<notebook>, as one markdown line."""
    colab = f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{notebook}"
    binder = f"https://mybinder.org/v2/gh/{REPO}/{BRANCH}?urlpath=lab/tree/notebooks/{notebook}"
    return (f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab}) "
            f"[![Binder](https://mybinder.org/badge_logo.svg)]({binder})")


SETUP_CELL = f'''# NBVAL_IGNORE_OUTPUT
# Setup, the same in every notebook: on Colab (or wherever qlearn is missing) fetch the course and
# install it; then seed everything and pick the device (a CUDA GPU when there is one, else the CPU).
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("qlearn") is None:
    subprocess.run(["git", "clone", "-q", "--depth", "1", "https://github.com/{REPO}", "qlearn-course"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "qlearn-course"], check=True)
    sys.path.insert(0, os.path.abspath("qlearn-course"))
import qlearn

qlearn.seed_everything(0)
DEVICE = qlearn.get_device()
MODEL = os.environ.get("QLEARN_MODEL", "tiny")  # "tiny" is the embedded model; on a GPU try a hub id
print(f"qlearn {{qlearn.__version__}}, torch {{qlearn.environment_report().torch}}, device: {{DEVICE}}")
assert DEVICE.type in ("cpu", "cuda")'''
