"""Helpers of the opt-in tests that build a fresh environment (test_binder.py, test_wheelhouse.py):
a copy of the repository, a new virtual environment, and where the CPU build of torch comes from
on a machine that cannot reach PyTorch's index."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX_HOST = "download.pytorch.org"
# What a learner's clone does not have, or what is built here: left out of the copy.
NOT_COPIED = (".git", ".venv", ".gpu-site", ".scratch", "learner", "wheelhouse", "node_modules", "screenshots",
              "__pycache__", "*.egg-info", ".ipynb_checkpoints", ".pytest_cache", ".ruff_cache")


def require_opt_in(config, marker: str) -> None:
    """Skip (saying how to run it) unless `-m <marker>` selected this test explicitly: the test takes
    minutes, so `-o addopts=""` (which drops the default deselection) must not start it by accident."""
    expression = config.getoption("markexpr") or ""
    if marker not in expression or f"not {marker}" in expression:
        pytest.skip(f"opt-in, takes minutes: python -m pytest -m {marker} tests/test_{marker}.py")


def copy_repository(dest: Path) -> Path:
    """The working tree as a learner's clone has it (no .git, no virtual environment)."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*NOT_COPIED))
    return dest


def cpu_index_reachable(timeout_s: float = 5.0) -> bool:
    try:
        socket.create_connection((CPU_INDEX_HOST, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def local_torch_wheels() -> Path | None:
    """A folder holding torch's CPU wheel: QLEARN_TORCH_FIND_LINKS, else one of pip's configured
    find-links (this machine's: the CPU wheel on disk); None when there is none."""
    candidates = [os.environ.get("QLEARN_TORCH_FIND_LINKS", "")]
    out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                         capture_output=True, text=True, check=False).stdout
    candidates += out.split() + os.environ.get("PIP_FIND_LINKS", "").split()
    for folder in filter(None, candidates):
        if Path(folder).is_dir() and any(Path(folder).glob("torch-*+cpu-*.whl")):
            return Path(folder)
    return None


def new_venv(python: str, where: Path) -> Path:
    """A new virtual environment made by `python`; returns its bin/ (Scripts/ on Windows)."""
    subprocess.run([python, "-m", "venv", str(where)], check=True, timeout=300)
    return where / ("Scripts" if os.name == "nt" else "bin")


def venv_env(bin_dir: Path, clean_pip: bool = False) -> dict[str, str]:
    """The environment of a shell in that venv (its bin/ first on PATH). `clean_pip` drops pip's
    configuration (files and PIP_* variables), so that only the command line says where packages come from."""
    env = {k: v for k, v in os.environ.items() if not (clean_pip and k.startswith("PIP_"))}
    env.update(PATH=str(bin_dir) + os.pathsep + env.get("PATH", ""), VIRTUAL_ENV=str(bin_dir.parent))
    env.pop("PYTHONHOME", None)
    if clean_pip:
        env["PIP_CONFIG_FILE"] = os.devnull  # pip reads no configuration file at all
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int, log: list[str]) -> subprocess.CompletedProcess:
    """Run a step; its command, seconds and output tail go to `log` (printed by the test)."""
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    log.append(f"$ {' '.join(cmd)}   [{time.perf_counter() - start:.0f} s, exit {out.returncode}]")
    if out.returncode != 0:
        log.append((out.stdout + out.stderr)[-4000:])
    return out
