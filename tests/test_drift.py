"""The drift guard (qlearn.course.drift): every keyword the course passes to bitsandbytes, peft,
transformers and torchao exists in the installed versions; and the guard itself fails, naming the
library and the argument, on a deliberately wrong keyword."""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from qlearn.course import drift

ROOT = Path(__file__).resolve().parent.parent


def drifts_in(source, where="demo.py"):
    return drift.check(drift.collect_source(source, where))


@pytest.mark.slow  # imports transformers, peft, bitsandbytes and torchao
def test_the_course_passes_only_keywords_the_installed_libraries_accept():
    sites = drift.collect()
    callees = {s.callee for s in sites}
    # what the guard must see (else it checks nothing): the calls the issue names, found by parsing
    for wanted in ("transformers.BitsAndBytesConfig", "peft.LoraConfig", "peft.prepare_model_for_kbit_training",
                   "transformers.AutoModelForCausalLM.from_pretrained", "bitsandbytes.functional.quantize_4bit"):
        assert wanted in callees, f"no call to {wanted} found in qlearn/ or notebooks/"
    assert any(s.where.startswith("notebooks/") for s in sites) and any(s.where.startswith("qlearn/") for s in sites)
    from_pretrained = {kw for s in sites if s.callee.endswith("AutoModelForCausalLM.from_pretrained") for kw in s.keywords}
    assert {"dtype", "quantization_config"} <= from_pretrained  # passed through qlearn.models' **kwargs dict
    drifts = drift.check(sites)
    assert not drifts, "the libraries moved under the course:\n" + "\n".join(map(str, drifts))


def test_a_misspelt_keyword_fails_naming_the_library_the_argument_and_the_place():
    src = "from transformers import BitsAndBytesConfig\ncfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_typ='nf4')\n"
    [found] = drifts_in(src)
    assert (found.library, found.keyword) == ("transformers", "bnb_4bit_quant_typ")
    assert str(found) == (f"transformers {version('transformers')}: transformers.BitsAndBytesConfig() does not "
                          "accept the keyword bnb_4bit_quant_typ= (demo.py:2); did you mean bnb_4bit_quant_type=?")


def test_from_pretrained_load_in_4bit_is_drift_since_transformers_5():
    src = """from transformers import AutoModelForCausalLM
def load(path):
    kw = {"dtype": None}
    kw["device_map"] = "cpu"
    kw.update(load_in_4bit=True)
    return AutoModelForCausalLM.from_pretrained(path, **kw)
"""
    assert [(d.keyword, d.site.where) for d in drifts_in(src)] == [("load_in_4bit", "demo.py:6")]


def test_bitsandbytes_functions_are_checked_through_module_aliases():
    src = """import bitsandbytes as bnb
import bitsandbytes.functional as F
F.quantize_4bit(w, blocksize=64, quant_typ="nf4")
bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
bnb.nn.Linear4bit(4, 4, compute_dtype=None, quant_typ="nf4")
"""
    got = [(d.site.callee, d.keyword, d.site.where) for d in drifts_in(src)]
    assert got == [("bitsandbytes.functional.quantize_4bit", "quant_typ", "demo.py:3"),
                   ("bitsandbytes.nn.Linear4bit", "quant_typ", "demo.py:5")]
    assert str(drifts_in(src)[0]).startswith(f"bitsandbytes {version('bitsandbytes')}: ")


def test_a_name_the_library_removed_is_drift():
    [found] = drifts_in("from peft import prepare_model_for_int8_training\nprepare_model_for_int8_training(m)\n")
    assert found.keyword is None
    assert str(found) == f"peft {version('peft')}: peft.prepare_model_for_int8_training no longer exists (demo.py:2)"


def test_notebook_cells_share_their_imports_and_magics_do_not_stop_the_parse(tmp_path):
    (tmp_path / "qlearn").mkdir()
    (tmp_path / "notebooks").mkdir()
    cells = [{"cell_type": "code", "source": "%matplotlib inline\nfrom peft import LoraConfig", "metadata": {},
              "outputs": [], "execution_count": None},
             {"cell_type": "markdown", "source": "LoRA", "metadata": {}},
             {"cell_type": "code", "source": "!echo hi\ncfg = LoraConfig(r=8, lora_alph=16)", "metadata": {},
              "outputs": [], "execution_count": None}]
    (tmp_path / "notebooks" / "n.ipynb").write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4,
                                                                "nbformat_minor": 5}))
    [found] = drift.check(drift.collect(tmp_path))
    assert found.keyword == "lora_alph" and found.site.where == "notebooks/n.ipynb, cell 2, line 2"
    assert str(found).endswith("did you mean lora_alpha=?")


def test_unwatched_and_unresolvable_calls_are_left_alone():
    src = "import torch\ntorch.zeros(2, dtyp=1)\nmodel.from_pretrained('x', nonsense=1)\n"
    assert drift.collect_source(src, "demo.py") == []


@pytest.mark.slow  # a new interpreter importing the libraries
def test_the_command_exits_1_on_drift_and_prints_it(tmp_path):
    (tmp_path / "qlearn").mkdir()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "qlearn" / "m.py").write_text("from peft import LoraConfig\nLoraConfig(r=8, target_module=['q'])\n")
    out = subprocess.run([sys.executable, "-m", "qlearn.course.drift", "--root", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 1, out.stderr[-2000:]
    assert (f"DRIFT peft {version('peft')}: peft.LoraConfig() does not accept the keyword target_module= "
            "(qlearn/m.py:2); did you mean target_modules=?") in out.stdout


def test_latest_constraints_lift_only_the_moving_libraries():
    script = [sys.executable, str(ROOT / "scripts" / "latest_constraints.py")]
    text = subprocess.run(script, capture_output=True, text=True, check=True, timeout=60).stdout
    names = {line.split("==")[0].lower().replace("_", "-") for line in text.splitlines() if "==" in line}
    assert {"torch", "numpy", "jupyterlab"} <= names  # the rest of the tested set stays pinned
    assert names.isdisjoint({"transformers", "peft", "bitsandbytes", "accelerate", "torchao", "huggingface-hub"})
    moving = subprocess.run([*script, "--names"], capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert "transformers" in moving and "torch" not in moving
    bad = subprocess.run([*script, "no-such-lib"], capture_output=True, text=True, check=False, timeout=60)
    assert bad.returncode == 2 and "names: not pinned in constraints.txt: no-such-lib" in bad.stderr
