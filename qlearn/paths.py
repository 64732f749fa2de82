"""Where the course's files live: the repository's data/ and notebooks/ folders.

QLEARN_DATA overrides the data folder (an instructor can point every machine at a shared copy).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The folder holding the embedded model (tiny/), the validation text and tasks/."""
    return Path(os.environ.get("QLEARN_DATA", ROOT / "data"))


def notebooks_dir() -> Path:
    return ROOT / "notebooks"
