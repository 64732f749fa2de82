"""The offline classroom (docs/instructor.md): scripts/make_wheelhouse.py builds the wheelhouse, then
a fresh venv installs the course from it alone (`pip install --no-index --find-links wheelhouse ...`,
no pip configuration, no index) and `qlearn doctor` passes.

Opt-in (minutes: it downloads every pinned package, 0.43 GB;
22 min on the loaded 2-core machine, most of it the offline install):
    python -m pytest -m wheelhouse tests/test_wheelhouse.py
QLEARN_WHEELHOUSE=DIR reuses a wheelhouse built before (the script is then not run).
Where PyTorch's CPU index cannot be reached (this machine, CI), the script's step 1 takes torch's
CPU wheel from a folder (--torch-find-links: QLEARN_TORCH_FIND_LINKS, else pip's configured
find-links); the wheel is the same file the index serves.
"""

import os
import sys
from pathlib import Path

import fresh_env
import pytest
from fresh_env import ROOT, copy_repository, cpu_index_reachable, local_torch_wheels, new_venv, run, venv_env

from qlearn.course.conventions import CPU_INDEX

sys.path.insert(0, str(ROOT / "scripts"))
import make_wheelhouse  # scripts/ is not a package


def test_the_wheelhouse_script_follows_the_instructor_guide():
    """Fast: the three pip download steps, as docs/instructor.md gives them."""
    out = Path("wheelhouse")
    step1, step2, step3 = make_wheelhouse.steps(out)
    assert make_wheelhouse.CPU_INDEX == CPU_INDEX
    assert step1[-4:] == ["--no-deps", "--index-url", CPU_INDEX, "torch==2.13.0"]
    assert step2[-4:] == ["--find-links", "wheelhouse", "-r", str(ROOT / "constraints.txt")]
    assert step3[-2:] == ["setuptools>=68", "wheel"]  # pyproject's [build-system], for pip install -e offline
    local = make_wheelhouse.steps(out, Path("/wheels"))[0]
    assert local[-5:] == ["--no-deps", "--no-index", "--find-links", "/wheels", "torch==2.13.0"]
    guide = (ROOT / "docs" / "instructor.md").read_text()
    assert "python scripts/make_wheelhouse.py" in guide
    assert 'pip install --no-index --find-links wheelhouse -c constraints.txt -e ".[test,lab]"' in guide


@pytest.mark.wheelhouse
def test_the_course_installs_offline_from_the_wheelhouse_and_doctor_passes(tmp_path, request):
    fresh_env.require_opt_in(request.config, "wheelhouse")
    repo, log = copy_repository(tmp_path / "repo"), []
    try:
        if os.environ.get("QLEARN_WHEELHOUSE"):
            wheelhouse = Path(os.environ["QLEARN_WHEELHOUSE"]).resolve()
        else:
            wheelhouse = tmp_path / "wheelhouse"
            cmd = [sys.executable, str(repo / "scripts" / "make_wheelhouse.py"), "--out", str(wheelhouse)]
            if not cpu_index_reachable():
                wheels = local_torch_wheels()
                if wheels is None:
                    pytest.skip(f"{CPU_INDEX} is unreachable and no folder holds torch's CPU wheel "
                                "(set QLEARN_TORCH_FIND_LINKS)")
                cmd += ["--torch-find-links", str(wheels)]
            out = run(cmd, repo, dict(os.environ), 3600, log)
            assert out.returncode == 0, "\n".join(log)
            log.append(out.stdout.strip().splitlines()[-2])  # "N files, X GB"
        bin_dir = new_venv(sys.executable, tmp_path / "venv")
        env = venv_env(bin_dir, clean_pip=True)  # no index, no find-links but the wheelhouse
        install = [str(bin_dir / "pip"), "install", "--no-index", "--find-links", str(wheelhouse), "-c",
                   "constraints.txt", "-e", ".[test,lab]"]
        out = run(install, repo, env, 1800, log)
        assert out.returncode == 0, "\n".join(log)
        torch = run([str(bin_dir / "python"), "-c", "import torch; print(torch.__version__)"], repo, env, 300, log)
        assert torch.stdout.strip() == "2.13.0+cpu"
        doctor = run([str(bin_dir / "qlearn"), "doctor"], repo, env, 600, log)
        assert doctor.returncode == 0 and "ready: every required check passed" in doctor.stdout, doctor.stdout
        log.append(doctor.stdout)
    finally:
        print("\n".join(log))
