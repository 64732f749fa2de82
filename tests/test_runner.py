"""qlearn.course.runner: headless execution of notebooks (small notebooks made in tmp_path)."""

import json

import nbformat
import pytest

from qlearn.course.runner import find_notebooks, read_notebook, run_notebook


def test_a_good_notebook_passes_runs_in_its_folder_and_is_not_written(tmp_path, make_notebook):
    path = make_notebook("good.ipynb", "import os\nx = 6 * 7", "print(x, os.getcwd())")
    before = path.read_bytes()
    result = run_notebook(path)
    assert result.ok and result.status == "passed" and result.error == "" and result.seconds > 0
    assert result.notebook.cells[1].outputs[0]["text"] == f"42 {tmp_path.resolve()}\n"
    assert path.read_bytes() == before  # executed as a copy in memory


def test_write_saves_the_outputs(make_notebook):
    path = make_notebook("w.ipynb", "print('hello')")
    assert run_notebook(path, write=True).ok
    cell = nbformat.read(path, as_version=4).cells[0]
    assert cell.outputs[0]["text"] == "hello\n" and cell.execution_count == 1


def test_a_failing_cell_is_reported_with_its_source_and_nothing_is_written(make_notebook):
    path = make_notebook("bad.ipynb", "a = 1", "b = a + 1\nraise ValueError('broken on purpose')",
                         "print('never reached')")
    before = path.read_bytes()
    result = run_notebook(path, write=True)
    assert result.status == "failed" and not result.ok
    assert result.cell_index == 1 and "raise ValueError" in result.cell
    assert result.error == "cell 1: ValueError: broken on purpose"
    assert result.notebook.cells[2].outputs == []  # execution stopped at the failing cell
    assert path.read_bytes() == before  # a failed run never overwrites the notebook, even with write=True


def test_an_assert_without_a_message_is_reported_with_its_line(make_notebook):
    path = make_notebook("bare.ipynb", "a = 1", "b = a + 1\nassert b == 3\nprint(b)")
    assert run_notebook(path).error == "cell 1: AssertionError at line 2: assert b == 3"
    path = make_notebook("said.ipynb", "assert 2 == 3, 'two is not three (2 vs 3)'")
    assert run_notebook(path).error == "cell 0: AssertionError: two is not three (2 vs 3)"


def test_progress_hears_of_every_code_cell(make_notebook):
    path = make_notebook("p.ipynb", "md:# title", "x = 1", "", "y = 2", "raise ValueError('stop')", "z = 3")
    calls = []
    result = run_notebook(path, progress=lambda done, total: calls.append((done, total)))
    assert result.status == "failed"  # the failing cell counts as run; the one after it never runs
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4)]  # 4 code cells with a source (the empty one is skipped)


def test_a_cell_over_the_timeout_fails_the_run(make_notebook):
    path = make_notebook("slow.ipynb", "import time\ntime.sleep(60)")
    result = run_notebook(path, timeout=2)
    assert result.status == "failed" and "timeout of 2 s" in result.error


def test_a_missing_kernel_is_a_failed_run_not_a_crash(make_notebook):
    result = run_notebook(make_notebook("k.ipynb", "1"), kernel_name="no-such-kernel")
    assert result.status == "failed" and "could not run the notebook" in result.error


@pytest.mark.parametrize("name,content,message", [
    ("missing.ipynb", None, "no such notebook: "),
    ("broken.ipynb", "{ not json", "cannot read "),
    ("schema.ipynb", json.dumps({"cells": 3, "nbformat": 4, "nbformat_minor": 5, "metadata": {}}), "cannot read "),
    ("notes.txt", "hello", "not a notebook: "),
])
def test_missing_and_malformed_notebooks_are_invalid_and_untouched(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = run_notebook(path, write=True)
    assert result.status == "invalid" and result.error.startswith(message) and str(path) in result.error
    assert result.notebook is None
    if content is None:
        assert not path.exists()
    else:
        assert path.read_text() == content  # nothing overwritten
    with pytest.raises(ValueError, match=message):
        read_notebook(path)


def test_a_folder_is_not_a_notebook(tmp_path):
    (tmp_path / "d.ipynb").mkdir()
    assert run_notebook(tmp_path / "d.ipynb").error.startswith("not a notebook")


def test_find_notebooks_expands_folders_sorted_and_keeps_files_in_order(tmp_path, make_notebook):
    b, a = make_notebook("02_b.ipynb", "1"), make_notebook("01_a.ipynb", "1")
    (tmp_path / "notes.txt").write_text("x")
    assert find_notebooks(None, tmp_path) == [a, b]
    assert find_notebooks([str(tmp_path)], tmp_path / "elsewhere") == [a, b]
    assert find_notebooks([str(b), str(a), "missing.ipynb"], tmp_path) == [b, a, tmp_path.__class__("missing.ipynb")]
