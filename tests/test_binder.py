"""Binder's environment built from binder/ as repo2docker builds it, then `qlearn doctor` and
notebook 00 run in it.

Opt-in (minutes: a fresh install of every pinned package):
    python -m pytest -m binder tests/test_binder.py

repo2docker's Python buildpack (chosen because binder/ holds requirements.txt and runtime.txt):
  1. Python at binder/runtime.txt's version;
  2. `pip install -r binder/requirements.txt` (its `-c ../constraints.txt` is relative to the file);
  3. binder/postBuild (here: `pip install --no-deps -e .`);
  4. JupyterLab opens notebooks/00 (the badge's urlpath). Here: `qlearn doctor`, then notebook 00
     executed headless (`qlearn run`), in that environment.
What differs from repo2docker:
  - repo2docker starts from its own conda environment (with its JupyterLab, notebook and
    jupyterhub-singleuser) and installs requirements.txt on top; here a bare venv of the same Python;
  - it runs as the user jovyan inside a container; here the current user in a copy of the repository;
  - where PyTorch's CPU index cannot be reached (this machine, CI: only PyPI), requirements.txt's
    `--extra-index-url https://download.pytorch.org/whl/cpu` line becomes `--find-links DIR`, DIR a folder
    holding the same torch==2.13.0+cpu wheel (QLEARN_TORCH_FIND_LINKS, else pip's configured find-links);
    everything else comes from PyPI (or pip's configured mirror of it) as on Binder.
"""

import re
import shutil
import sys

import fresh_env
import pytest
from fresh_env import ROOT, copy_repository, cpu_index_reachable, local_torch_wheels, new_venv, run, venv_env

from qlearn.course.conventions import CPU_INDEX

sys.path.insert(0, str(ROOT / "scripts"))
import make_binder_requirements as mbr  # scripts/ is not a package


@pytest.mark.binder
def test_binder_environment_builds_as_repo2docker_does_and_runs_doctor_and_notebook_00(tmp_path, request):
    fresh_env.require_opt_in(request.config, "binder")
    repo = copy_repository(tmp_path / "repo")
    # Step 1: Python at runtime.txt's version
    runtime = (repo / "binder" / "runtime.txt").read_text().strip()  # e.g. "python-3.11"
    wanted = runtime.removeprefix("python-")
    python = shutil.which(f"python{wanted}")
    if python is None:
        pytest.skip(f"binder/runtime.txt asks for Python {wanted}; this machine has no python{wanted}")
    requirements = repo / "binder" / "requirements.txt"
    differs = []
    if not cpu_index_reachable():
        wheels = local_torch_wheels()
        if wheels is None:
            pytest.skip(f"{CPU_INDEX} is unreachable and no folder holds torch's CPU wheel "
                        "(set QLEARN_TORCH_FIND_LINKS)")
        text = requirements.read_text().replace(f"--extra-index-url {CPU_INDEX}", f"--find-links {wheels}")
        requirements.write_text(text)
        differs.append(f"PyTorch's CPU index unreachable: torch's CPU wheel from {wheels}")
    bin_dir = new_venv(python, tmp_path / "venv")
    env, log = venv_env(bin_dir), []
    try:
        # Step 2: the requirements, from the repository's root as repo2docker runs it
        out = run([str(bin_dir / "pip"), "install", "-r", "binder/requirements.txt"], repo, env, 1800, log)
        assert out.returncode == 0, "\n".join(log)
        # Step 3: postBuild
        out = run(["bash", "binder/postBuild"], repo, env, 600, log)
        assert out.returncode == 0, "\n".join(log)
        version = run([str(bin_dir / "python"), "-c", "import sys; print(sys.version.split()[0])"], repo, env, 60, log)
        assert version.stdout.startswith(wanted + "."), version.stdout
        freeze = run([str(bin_dir / "pip"), "freeze", "--exclude-editable"], repo, env, 120, log).stdout
        installed = {m.group(1).lower().replace("_", "-"): m.group(2)
                     for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)$", freeze, re.MULTILINE)}
        pins = mbr.pins()
        wrong = {n: v for n, v in installed.items() if n in pins and v.split("+")[0] != pins[n]}
        assert not wrong, f"installed versions other than constraints.txt's: {wrong}"
        assert installed["torch"] == pins["torch"] + "+cpu"  # Binder has no GPU: no CUDA libraries
        assert not any(n.startswith("nvidia-") for n in installed)
        # Step 4: the machine is ready, and the first notebook runs
        doctor = run([str(bin_dir / "qlearn"), "doctor"], repo, env, 600, log)
        assert doctor.returncode == 0 and "ready: every required check passed" in doctor.stdout, doctor.stdout
        log.append(doctor.stdout)
        nb = run([str(bin_dir / "qlearn"), "run", "--quiet", "notebooks/00_start_here.ipynb"], repo, env, 900, log)
        assert nb.returncode == 0 and "1 passed, 0 failed" in nb.stdout, nb.stdout + nb.stderr[-3000:]
        log.append(nb.stdout)
    finally:
        print("\n".join(log + [f"differs from repo2docker: {d}" for d in differs]))
