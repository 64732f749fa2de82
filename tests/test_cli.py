"""The `qlearn` command line: doctor, lab, run, exercises build/check (on small notebooks made here)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import CHECKER, EXERCISE, EXERCISE_HEADING, LATER, write_notebook

from qlearn.course import cli, doctor, exercises
from qlearn.course.exercises import ExerciseResult
from qlearn.paths import notebooks_dir
from qlearn.course.runner import RunResult

CHECKS = ("python", "torch", "device", "bitsandbytes", "transformers", "peft", "accelerate", "model",
          "jupyterlab", "nbval")


def lines_by_check(text):
    """{check name: its status word} from doctor's report."""
    return {line.split()[1]: line.split()[0] for line in text.splitlines() if line[:4] in ("OK  ", "FAIL", "WARN")}


def test_doctor_passes_here_and_reports_every_check(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert lines_by_check(out) == {name: "OK" for name in CHECKS}
    assert "nf4 max error" in out and "int8 max error" in out and "9.3M parameters, finite logits" in out
    assert out.rstrip().endswith("ready: every required check passed")


def test_doctor_fails_with_a_fix_when_the_model_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QLEARN_DATA", str(tmp_path))  # an empty data folder: no tiny/
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert lines_by_check(out)["model"] == "FAIL"
    assert f"missing: {tmp_path / 'tiny'} has no config.json" in out
    assert f"fix: QLEARN_DATA={tmp_path} has no usable tiny/" in out
    assert out.rstrip().endswith("not ready: fix the FAIL lines above")


def test_doctor_warns_on_a_cpu_build_of_torch_beside_an_nvidia_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build, as the README's CPU index gives
    monkeypatch.setattr(doctor, "_nvidia_gpu", lambda: "/proc/driver/nvidia/gpus")
    check = doctor._device()
    assert check.status == "WARN" and "is a CPU build, but this machine has an NVIDIA GPU (/proc/driver/nvidia/gpus)" \
        in check.detail
    assert "pip install --force-reinstall torch==2.13.0 --index-url https://pypi.org/simple" in check.fix
    monkeypatch.setattr(doctor, "_nvidia_gpu", lambda: "")  # no GPU: the CPU build is what this machine needs
    assert doctor._device().status == "OK"


def test_an_optional_failure_warns_without_failing_the_report():
    checks = [doctor.Check("torch", True, "2.13"), doctor.Check("jupyterlab", False, "not installed", "pip ...",
                                                                 required=False)]
    text, ok = doctor.report(checks)
    assert ok and "WARN  jupyterlab" in text and "fix: pip ..." in text
    text, ok = doctor.report([*checks, doctor.Check("peft", False, "not installed", "pip install peft")])
    assert not ok and "FAIL  peft" in text and "      fix: pip install peft" in text


def serve_nothing(monkeypatch, root=False):
    """Record the JupyterLab command instead of starting it; `root`: run as root or not."""
    calls = []
    monkeypatch.setattr(cli, "_serve", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setattr(cli, "_is_root", lambda: root)
    return calls


def test_lab_opens_jupyterlab_on_the_notebooks(monkeypatch, capsys):
    calls = serve_nothing(monkeypatch)
    assert cli.main(["lab"]) == 0
    assert calls == [[sys.executable, "-m", "jupyterlab", f"--notebook-dir={notebooks_dir()}"]]
    assert capsys.readouterr().err == ""


def test_lab_passes_unknown_options_to_jupyterlab_in_order(monkeypatch):
    calls = serve_nothing(monkeypatch)
    assert cli.main(["lab", "--no-browser", "--port", "8899", "--notebook-dir", "nb", "--", "--ip=0.0.0.0"]) == 0
    assert calls == [[sys.executable, "-m", "jupyterlab", "--notebook-dir=nb", "--no-browser", "--port", "8899",
                      "--ip=0.0.0.0"]]


def test_lab_as_root_passes_allow_root_and_says_so_in_one_line(monkeypatch, capsys):
    calls = serve_nothing(monkeypatch, root=True)
    assert cli.main(["lab", "--no-browser"]) == 0
    assert calls[0][-2:] == ["--no-browser", "--allow-root"]
    assert capsys.readouterr().err == "qlearn lab: running as root (as in a container), so passing --allow-root to JupyterLab\n"
    assert cli.main(["lab", "--allow-root"]) == 0  # given already: not twice, nothing said
    assert calls[1].count("--allow-root") == 1 and capsys.readouterr().err == ""


def test_lab_help_documents_the_pass_through_and_root(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["lab", "-h"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "qlearn lab --no-browser --port 8899" in out and "--allow-root" in out and "JUPYTERLAB OPTION" in out


def test_other_commands_reject_options_they_do_not_know(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["doctor", "--no-browser"])
    assert stop.value.code == 2 and "unrecognized arguments: --no-browser" in capsys.readouterr().err


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="stops the server with SIGTERM (POSIX)")
def test_lab_serves_http_and_stops_on_sigterm(tmp_path):
    """`qlearn lab --no-browser --port P` answers /api/status within 120 s; SIGTERM to qlearn stops
    JupyterLab too (the port closes) and qlearn exits 0. About 5-10 s on the 2-core machine."""
    import json
    import os
    import signal
    import time
    import urllib.request

    port, token = _free_port(), "qlearn-test-token"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    cmd = [sys.executable, "-m", "qlearn.course.cli", "lab", "--no-browser", "--port", str(port), "--ip", "127.0.0.1",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", "--notebook-dir", str(tmp_path)]
    log = tmp_path / "lab.log"
    with open(log, "w") as out:
        lab = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/status"
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    try:
        deadline, status = time.monotonic() + 120, None
        while status is None and time.monotonic() < deadline and lab.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    status = json.load(response)
            except OSError:
                time.sleep(0.3)
        assert status is not None, f"no answer on {url}:\n{log.read_text()[-3000:]}"
        assert {"started", "kernels"} <= status.keys()
        if os.geteuid() == 0:
            assert "passing --allow-root to JupyterLab" in log.read_text()
        lab.send_signal(signal.SIGTERM)
        assert lab.wait(timeout=60) == 0, log.read_text()[-3000:]
        with pytest.raises(OSError):  # JupyterLab went with it: nothing listens on the port any more
            urllib.request.urlopen(request, timeout=2)
    finally:
        if lab.poll() is None:
            os.killpg(lab.pid, signal.SIGKILL)  # the group this test started: qlearn and its JupyterLab
            lab.wait()


def test_lab_names_the_extra_when_jupyterlab_is_missing(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jupyterlab" else real(name, *a))
    assert cli.main(["lab"]) == 1
    assert 'pip install -c constraints.txt -e ".[lab]"' in capsys.readouterr().err


def test_run_prints_a_table_and_shows_the_failing_cell(tmp_path, capsys):
    good = write_notebook(tmp_path / "01_good.ipynb", "print(1)")
    bad = write_notebook(tmp_path / "02_bad.ipynb", "a = 1", "raise ValueError('broken on purpose')", "b = 2")
    before = good.read_bytes(), bad.read_bytes()
    assert cli.main(["run", "--quiet", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["notebook", "status", "seconds"]
    assert [r[:2] for r in rows[2:4]] == [["01_good.ipynb", "passed"], ["02_bad.ipynb", "failed"]]
    assert float(rows[2][2]) > 0 and out.rstrip().endswith("1 passed, 1 failed")
    assert "cell 1: ValueError: broken on purpose" in err
    assert "failing cell (1):\n    raise ValueError('broken on purpose')" in err
    assert (good.read_bytes(), bad.read_bytes()) == before  # without --write nothing is written


def test_run_write_refreshes_outputs(tmp_path, capsys):
    nb = write_notebook(tmp_path / "w.ipynb", "print('hello')")
    assert cli.main(["run", "--quiet", "--write", str(nb)]) == 0
    assert nbformat.read(nb, as_version=4).cells[0].outputs[0]["text"] == "hello\n"
    assert "outputs written to 1 notebook" in capsys.readouterr().out


@pytest.mark.parametrize("name,content,message", [
    ("broken.ipynb", "{ not json", "cannot read "),
    ("notes.txt", "hello", "not a notebook: "),
])
def test_run_rejects_missing_and_malformed_notebooks(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert cli.main(["run", "--quiet", "--write", str(path)]) == 1
    out, err = capsys.readouterr()
    assert f"{path}: invalid: {message}{path}" in err and f"{name}  invalid" in out
    assert path.read_text() == content  # nothing overwritten


def test_run_on_an_empty_folder_fails(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path)]) == 1
    assert "no notebooks in" in capsys.readouterr().err


def test_exercises_build_then_check_a_learner_copy(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_notebook(src / "09_demo.ipynb", EXERCISE_HEADING, EXERCISE, CHECKER, LATER)
    out = tmp_path / "learner"
    assert cli.main(["exercises", "build", str(src), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out / '09_demo.ipynb'}: 1 exercise stubbed\n"
    assert cli.main(["exercises", "check", str(out)]) == 1  # NOT ATTEMPTED is not PASSED
    text = capsys.readouterr().out
    assert text.splitlines()[2].split() == ["09_demo.ipynb", "9.1", "NOT", "ATTEMPTED", "double", "a", "number"]
    assert "0 passed, 0 failed, 1 not attempted; 0 notebooks failed to run" in text


def fake_run(name, status="passed", error=""):
    return RunResult(Path(name), status, 1.0, error)


@pytest.mark.parametrize("results,allow_missing,code", [
    ([("PASSED", "")], False, 0),
    ([("PASSED", ""), ("NOT ATTEMPTED", "stub")], False, 1),
    ([("PASSED", ""), ("NOT ATTEMPTED", "stub")], True, 0),
    ([("FAILED", "expected 42, got 23. Hint: multiply by two")], True, 1),
    ([], True, 1),  # no checker printed anything: nothing was checked
])
def test_exercises_check_exit_status(tmp_path, monkeypatch, capsys, results, allow_missing, code):
    runs = [(fake_run("02_x.ipynb"), [ExerciseResult(s, f"2.{i}", "a title", m) for i, (s, m) in enumerate(results)])]
    monkeypatch.setattr(exercises, "check", lambda paths, timeout, run: runs)
    (tmp_path / "02_x.ipynb").write_text("{}")
    assert cli.main(["exercises", "check", *(["--allow-missing"] * allow_missing), str(tmp_path)]) == code
    out = capsys.readouterr().out
    for i, (status, message) in enumerate(results):
        assert f"02_x.ipynb  2.{i}       {status}" in out
        if status == "FAILED":
            assert f"FAILED 02_x.ipynb 2.{i} a title: {message}" in out


def test_exercises_check_fails_when_a_notebook_cannot_run(tmp_path, monkeypatch, capsys):
    runs = [(fake_run("03_y.ipynb", "failed", "cell 4: KeyError: 'w'"), [ExerciseResult("PASSED", "3.1", "t")])]
    monkeypatch.setattr(exercises, "check", lambda paths, timeout, run: runs)
    (tmp_path / "03_y.ipynb").write_text("{}")
    assert cli.main(["exercises", "check", "--allow-missing", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "03_y.ipynb  -         notebook failed  cell 4: KeyError: 'w'" in out
    assert "FAILED 03_y.ipynb (the notebook stopped): cell 4: KeyError: 'w'" in out
    assert "1 passed, 0 failed, 0 not attempted; 1 notebook failed to run" in out


def test_exercises_check_shows_the_asserts_message_or_the_failing_line(tmp_path, capsys):
    write_notebook(tmp_path / "01_said.ipynb", "ppl = 12.9", "assert ppl < 12.5, f'perplexity {ppl} is not below 12.5'")
    write_notebook(tmp_path / "02_bare.ipynb", "md:# a claim", "x = 2\nassert x == 3\nprint(x)")
    assert cli.main(["exercises", "check", "--quiet", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED 01_said.ipynb (the notebook stopped): cell 1: AssertionError: perplexity 12.9 is not below 12.5" in out
    assert "FAILED 02_bare.ipynb (the notebook stopped): cell 1: AssertionError at line 2: assert x == 3" in out


def test_exercises_check_draws_a_progress_bar_per_notebook(tmp_path, capsys):
    write_notebook(tmp_path / "09_demo.ipynb", EXERCISE_HEADING, EXERCISE, CHECKER, LATER)
    write_notebook(tmp_path / "10_more.ipynb", "x = 1", "")  # an empty cell is not counted
    assert cli.main(["exercises", "check", str(tmp_path)]) == 0  # 09 passes; 10_more has no exercise
    err = capsys.readouterr().err
    assert "09_demo.ipynb: 100%" in err and "| 3/3 cells [" in err
    assert "10_more.ipynb: 100%" in err and "| 1/1 cells [" in err


@pytest.mark.parametrize("argv", [["exercises", "check"], ["exercises", "build"], ["run"]])
def test_a_missing_notebook_is_a_usage_error_said_before_anything_runs(tmp_path, capsys, argv):
    real = write_notebook(tmp_path / "real.ipynb", "print(1)")
    missing = tmp_path / "nowhere" / "09_gone.ipynb"
    assert cli.main([*argv, str(real), str(missing)]) == 2
    out, err = capsys.readouterr()
    assert err == f"qlearn {' '.join(argv)}: no such notebook or folder: {missing}\n" and out == ""  # no bar, no table


def test_exercises_build_errors_are_reported_not_raised(tmp_path, capsys):
    nb = write_notebook(tmp_path / "n.ipynb", EXERCISE)
    assert cli.main(["exercises", "build", str(nb), "--out", str(tmp_path)]) == 1
    assert "would overwrite the solutions" in capsys.readouterr().err


def test_exercises_check_on_an_unreadable_notebook_fails(tmp_path, capsys):
    (tmp_path / "plain.ipynb").write_text("{")
    assert cli.main(["exercises", "check", str(tmp_path)]) == 1
    assert "plain.ipynb  -         notebook invalid  cannot read" in capsys.readouterr().out


def test_usage_errors_exit_with_status_2(capsys):
    for argv in ([], ["run", "--timeout", "soon"], ["exercises"], ["exercises", "check"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2, argv
    capsys.readouterr()


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "qlearn"
    out = subprocess.run([str(script), "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("doctor", "lab", "run", "exercises"):
        assert command in out.stdout
