"""qlearn's command line: doctor, run, exercises build/check (on small notebooks made here)."""

import json
import subprocess
import sys

import nbformat
import pytest

from qlearn import cli, exercises
from qlearn.check import PREFIX


def make_notebook(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


EXERCISE = '''def double(x):
    """Exercise: twice x."""
    ### BEGIN SOLUTION
    return 2 * x
    ### END SOLUTION'''
CHECKER = '''from qlearn.check import exercise
with exercise("9.1", "double") as ex:
    ex.equal(double(21), 42, "double(21)", hint="multiply by two")'''


def test_doctor_passes_here_and_names_every_check(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "torch", "device", "bitsandbytes", "transformers", "peft", "model"):
        assert any(line.split()[1:2] == [name] for line in out.splitlines()), name
    assert "nf4 round-trip error" in out
    assert out.rstrip().endswith("ready: every required check passed")


def test_doctor_fails_with_a_fix_when_the_model_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QLEARN_DATA", str(tmp_path))
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  model" in out and "fix: " in out and "not ready" in out


def test_run_passes_a_good_notebook_and_does_not_write_it(tmp_path, capsys):
    nb = make_notebook(tmp_path / "good.ipynb", "x = 1 + 1", "print(x)")
    before = nb.read_bytes()
    assert cli.main(["run", "--quiet", str(nb)]) == 0
    out = capsys.readouterr().out
    assert "good.ipynb  passed" in out and "1 passed, 0 failed" in out
    assert nb.read_bytes() == before


def test_run_write_saves_outputs(tmp_path):
    nb = make_notebook(tmp_path / "w.ipynb", "print('hello')")
    assert cli.main(["run", "--quiet", "--write", str(nb)]) == 0
    assert nbformat.read(nb, as_version=4).cells[0].outputs[0]["text"] == "hello\n"


def test_run_shows_the_failing_cell_and_exits_nonzero(tmp_path, capsys):
    nb = make_notebook(tmp_path / "bad.ipynb", "a = 1", "raise ValueError('broken on purpose')", "b = 2")
    before = nb.read_bytes()
    assert cli.main(["run", "--quiet", "--write", str(nb)]) == 1
    captured = capsys.readouterr()
    assert "bad.ipynb  failed" in captured.out
    assert "ValueError: broken on purpose" in captured.err and "raise ValueError" in captured.err
    assert nb.read_bytes() == before  # a failed run never overwrites the notebook


@pytest.mark.parametrize("name,content,message", [
    ("missing.ipynb", None, "no such notebook"),
    ("broken.ipynb", "{ not json", "cannot read"),
    ("notes.txt", "hello", "not a notebook"),
])
def test_run_rejects_missing_and_malformed_notebooks(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert cli.main(["run", "--quiet", str(path)]) == 1
    assert message in capsys.readouterr().err
    if content is not None:
        assert path.read_text() == content  # nothing overwritten


def test_strip_solutions_keeps_indentation_and_names_the_exercise():
    src, n = exercises.strip_solutions(EXERCISE)
    assert n == 1
    assert "return 2 * x" not in src
    assert '    raise NotImplementedError("Exercise double: replace this line with your solution")' in src
    header = "# Exercise 2.1: symmetric scale\n" + EXERCISE
    assert 'Exercise 2.1: symmetric scale' in exercises.strip_solutions(header)[0]


def test_strip_solutions_rejects_an_unclosed_span():
    with pytest.raises(ValueError, match="no matching"):
        exercises.strip_solutions("### BEGIN SOLUTION\nx = 1")


def test_built_copy_runs_to_the_end_with_the_exercise_not_attempted(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    make_notebook(src / "09_demo.ipynb", EXERCISE, CHECKER, "print('later cells still run')")
    out = tmp_path / "learner"
    [(path, n)] = exercises.build(src, out)
    assert n == 1 and not any(c.get("outputs") for c in nbformat.read(path, as_version=4).cells)
    assert cli.main(["exercises", "check", str(out)]) == 1  # not attempted is not passed
    text = capsys.readouterr().out
    assert "09_demo.ipynb  9.1       NOT ATTEMPTED" in text
    assert cli.main(["exercises", "check", "--allow-missing", str(out)]) == 0
    [(run, results)] = exercises.check([str(out)])
    assert run.ok and "later cells still run" in json.dumps(run.notebook.cells[2].outputs)
    # the solution copy passes
    assert cli.main(["exercises", "check", str(src)]) == 0
    assert "9.1       PASSED" in capsys.readouterr().out


def test_check_reports_a_wrong_answer_with_the_hint(tmp_path):
    wrong = EXERCISE.replace("return 2 * x", "return x + 2")
    make_notebook(tmp_path / "w.ipynb", wrong, CHECKER)
    [(run, [result])] = exercises.check([str(tmp_path)])
    assert result.status == "FAILED" and "expected 42, got 23" in result.message
    assert "multiply by two" in result.message


def test_checker_line_format_is_what_check_parses(capsys):
    from qlearn.check import exercise

    with exercise("1.2", "a title") as ex:
        ex.close(1.0, 2.0, "x", hint="h")
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{PREFIX} FAILED 1.2 a title: x: expected 2, got 1")


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "qlearn.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "doctor" in out.stdout and "exercises" in out.stdout
