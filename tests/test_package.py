"""The lazy package index reaches every module (issue 15: `import qlearn; qlearn.merging` once raised)."""

import pkgutil
import subprocess
import sys

import pytest

import qlearn
import qlearn.quant



@pytest.mark.parametrize("package", [qlearn, qlearn.quant], ids=lambda p: p.__name__)
def test_every_public_module_is_an_attribute_of_its_package(package):
    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    assert names, package.__path__
    for name in names:
        module = getattr(package, name)
        assert module.__name__ == f"{package.__name__}.{name}"
        assert name in package.__all__ or name in dir(package), name


def test_a_fresh_interpreter_reaches_a_module_through_the_index_alone():
    code = "import qlearn; print(qlearn.merging.__name__, qlearn.memory.estimate.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["qlearn.merging", "estimate"]


def test_an_unknown_attribute_names_itself():
    with pytest.raises(AttributeError, match="no attribute 'not_a_module'"):
        qlearn.not_a_module
