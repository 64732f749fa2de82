"""qlearn.course.exercises: learner copies with solutions stubbed, and checking them by running them."""

import json

import nbformat
import pytest
from conftest import CHECKER, EXERCISE, EXERCISE_HEADING, LATER, WRONG, write_notebook

from qlearn.course import exercises
from qlearn.check import PREFIX, exercise


def test_a_stub_keeps_the_indentation_and_names_the_exercise():
    src, n = exercises.strip_solutions(EXERCISE, "Exercise 9.1: double a number")
    assert n == 1 and "return 2 * x" not in src and "SOLUTION" not in src
    assert src.splitlines() == ['def double(x):', '    """Twice x."""',
                                '    raise NotImplementedError("Exercise 9.1: double a number")']


def test_the_name_comes_from_the_first_line_else_the_function():
    header = "# Exercise 2.1: symmetric scale\n" + EXERCISE
    assert 'NotImplementedError("Exercise 2.1: symmetric scale")' in exercises.strip_solutions(header)[0]
    assert 'NotImplementedError("Exercise double")' in exercises.strip_solutions(EXERCISE)[0]


def test_every_span_of_a_cell_is_stubbed_at_its_own_depth():
    src = EXERCISE + "\n\n\nclass A:\n    def f(self):\n        ### BEGIN SOLUTION\n        return 1\n        ### END SOLUTION"
    out, n = exercises.strip_solutions(src, "Exercise 1.1: two")
    assert n == 2 and out.count("raise NotImplementedError") == 2
    assert '        raise NotImplementedError("Exercise 1.1: two")' in out.splitlines()
    compile(out, "<stub>", "exec")  # still valid Python


def test_a_title_with_quotes_gives_valid_python():
    out, _ = exercises.strip_solutions(EXERCISE, 'Exercise 3.2: the "safe" path \\ merge')
    namespace = {}
    exec(out, namespace)  # noqa: S102 -- running the stub is the point
    with pytest.raises(NotImplementedError, match='the "safe" path'):
        namespace["double"](1)


@pytest.mark.parametrize("source,message", [
    ("def f():\n    ### BEGIN SOLUTION\n    return 1", "no matching '### END SOLUTION'"),
    ("def f():\n    ### BEGIN SOLUTION\n    ### BEGIN SOLUTION\n    ### END SOLUTION", "no matching"),
    ("def f():\n    return 1\n    ### END SOLUTION", "has no '### BEGIN SOLUTION' before it"),
    ("### BEGIN SOLUTION\nanswer = 1\n### END SOLUTION", "not inside a function body"),
])
def test_malformed_spans_are_rejected_with_the_place(source, message):
    with pytest.raises(ValueError, match=message) as err:
        exercises.strip_solutions(source, where="demo.ipynb, cell 3")
    assert "demo.ipynb, cell 3: " in str(err.value)


def test_names_come_from_the_markdown_heading_before_the_cell(tmp_path):
    path = write_notebook(tmp_path / "n.ipynb", "md:## Exercise 4.2: clip it", "md:Some more words.",
                          EXERCISE, "md:### Exercise 4.3: unused heading", "x = 1", EXERCISE)
    assert exercises.exercise_names(nbformat.read(path, as_version=4)) == {2: "Exercise 4.2: clip it", 5: None}


def test_a_learner_copy_has_stubs_and_no_outputs(tmp_path):
    path = write_notebook(tmp_path / "n.ipynb", EXERCISE_HEADING, EXERCISE, CHECKER)
    nb = nbformat.read(path, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="old")]
    nb.cells[2].execution_count = 7
    copy, n = exercises.learner_copy(nb)
    assert n == 1 and 'raise NotImplementedError("Exercise 9.1: double a number")' in copy.cells[1].source
    assert all(c.outputs == [] and c.execution_count is None for c in copy.cells if c.cell_type == "code")
    assert copy.cells[0].source == EXERCISE_HEADING[3:]  # markdown untouched


def test_build_refuses_to_overwrite_the_solutions(tmp_path):
    path = write_notebook(tmp_path / "n.ipynb", EXERCISE)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="would overwrite the solutions"):
        exercises.build([path], tmp_path)
    assert path.read_bytes() == before


def test_build_writes_nothing_when_a_notebook_is_bad(tmp_path):
    good = write_notebook(tmp_path / "a.ipynb", EXERCISE)
    bad = write_notebook(tmp_path / "b.ipynb", "def f():\n    ### BEGIN SOLUTION\n    return 1")
    out = tmp_path / "learner"
    with pytest.raises(ValueError, match="b.ipynb, cell 0: '### BEGIN SOLUTION' at line 2 has no matching"):
        exercises.build([good, bad], out)
    assert not out.exists()


def test_the_built_copy_runs_to_the_end_and_the_solution_copy_passes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_notebook(src / "09_demo.ipynb", EXERCISE_HEADING, EXERCISE, CHECKER, LATER)
    [(path, n)] = exercises.build([src / "09_demo.ipynb"], tmp_path / "learner")
    assert n == 1 and path == tmp_path / "learner" / "09_demo.ipynb"

    [(run, results)] = exercises.check([str(tmp_path / "learner")])
    assert run.ok, run.error  # the stub did not stop the notebook
    assert [(r.status, r.number, r.title) for r in results] == [("NOT ATTEMPTED", "9.1", "double a number")]
    assert "later cells still run" in json.dumps(run.notebook.cells[3].outputs)

    [(run, results)] = exercises.check([str(src / "09_demo.ipynb")])
    assert run.ok and [(r.status, r.number) for r in results] == [("PASSED", "9.1")]


def test_a_wrong_answer_is_failed_with_the_checkers_hint(tmp_path):
    write_notebook(tmp_path / "w.ipynb", WRONG, CHECKER, LATER)
    [(run, [result])] = exercises.check([str(tmp_path)])
    assert run.ok and result.status == "FAILED"
    assert result.message == "double(21): expected 42, got 23. Hint: multiply by two"


def test_check_results_parses_every_status_line(capsys):
    for status_code in ("pass", "fail", "stub"):
        with exercise("2.3", "round half to even") as ex:
            if status_code == "stub":
                raise NotImplementedError
            ex.equal(1, 1 if status_code == "pass" else 2, "x", hint="h")
    text = capsys.readouterr().out + "unrelated line\n" + f"{PREFIX} maybe\n"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("", outputs=[nbformat.v4.new_output("stream", name="stdout", text=text)])]
    got = [(r.status, r.number, r.title, r.message) for r in exercises.check_results(nb)]
    assert got == [("PASSED", "2.3", "round half to even", ""),
                   ("FAILED", "2.3", "round half to even", "x: expected 2, got 1. Hint: h"),
                   ("NOT ATTEMPTED", "2.3", "round half to even",
                    "the stub still raises NotImplementedError; the rest of the notebook runs on")]


def test_a_hint_follows_the_message_after_one_full_stop():
    for message, shown in (("got 1e+09", "got 1e+09. Hint: h"), ("too small.", "too small. Hint: h")):
        with exercise("0.1", "t") as ex:
            ex.fail(message, hint="h")
        assert ex.result.message == shown
    with exercise("0.1", "t") as ex:
        ex.fail("no hint")
    assert ex.result.message == "no hint"


def test_a_learner_copy_of_a_course_notebook_runs_to_the_end_with_every_exercise_not_attempted(tmp_path):
    # notebook 02: four exercises and ~20 s; later cells must not need the learner's answers
    from qlearn.paths import notebooks_dir

    source = notebooks_dir() / "02_linear_quantization.ipynb"
    [(path, n)] = exercises.build([source], tmp_path / "learner")
    [(run, results)] = exercises.check([str(path)])
    assert run.ok, run.error
    assert n == 4 and [(r.status, r.number) for r in results] == [("NOT ATTEMPTED", f"2.{k}") for k in range(1, 5)]
