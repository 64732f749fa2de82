"""Shared helpers of the tests of qlearn's command line, runner and exercise tools."""

import os

# qlearn.kernels' tests run in Triton's CPU interpreter where Triton is installed but no GPU is visible
# (`pip install triton`: the course does not need it; without it those tests skip and say why). The variable
# must be set before Triton's first import, which bitsandbytes does from other test modules.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import nbformat  # noqa: E402
import pytest

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def write_notebook(path, *cells):
    """A notebook at `path` whose cells are the given sources: code, or markdown when a source starts
    with "md:". Returns the path."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.cells = [nbformat.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbformat.v4.new_code_cell(c)
                for c in cells]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def make_notebook(tmp_path):
    """make_notebook(name, *cells): write_notebook into the test's temporary folder."""
    return lambda name, *cells: write_notebook(tmp_path / name, *cells)


# A small exercise in the course's convention (see qlearn/exercises.py), its checker, and a wrong answer.
EXERCISE_HEADING = "md:### Exercise 9.1: double a number\n\nWrite `double(x)`."
EXERCISE = '''def double(x):
    """Twice x."""
    ### BEGIN SOLUTION
    return 2 * x
    ### END SOLUTION'''
WRONG = EXERCISE.replace("return 2 * x", "return x + 2")
CHECKER = '''from qlearn.check import exercise
with exercise("9.1", "double a number") as ex:
    ex.equal(double(21), 42, "double(21)", hint="multiply by two")'''
LATER = "print('later cells still run')"


@pytest.fixture
def check_exercise(capsys):
    """check(checker, right, wrong, hint_word): a notebook checker passes the right answer and prints PASSED,
    fails the typical mistake with its hint and prints FAILED, and calls a stub NOT ATTEMPTED."""

    def stub(*args):
        raise NotImplementedError("your code here")

    def check(checker, right, wrong, hint_word):
        assert checker(right).passed
        assert "PASSED" in capsys.readouterr().out
        result = checker(wrong)
        assert result.status == "FAILED" and hint_word in result.message, result.message
        assert "FAILED" in capsys.readouterr().out
        assert checker(stub).status == "NOT ATTEMPTED"

    return check
