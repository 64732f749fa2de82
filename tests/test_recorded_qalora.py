"""benchmarks/cpu/qalora_tiny.json (benchmarks/qalora_tiny.py) as notebook 08 shows it: the committed outputs of the
cell that reads the record print the record's figures (nbval masks their "~" numbers, so this test is what ties
the displayed figures to the file), and the record supports the claims the notebook asserts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlearn.experiment import load_record

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "benchmarks" / "cpu" / "qalora_tiny.json"
NOTEBOOK = ROOT / "notebooks" / "08_merging.ipynb"
ARMS = ("QA-LoRA", "LoRA-INT4", "LoRA-NF4")


def recorded_cell_output() -> str:
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"]
             if c["cell_type"] == "code" and "qalora_tiny.json" in "".join(c["source"])]
    if not cells:
        pytest.skip("notebook 08 does not read benchmarks/cpu/qalora_tiny.json")
    assert len(cells) == 1, "one cell reads the record"
    return "".join("".join(o.get("text", "")) for o in cells[0].get("outputs", []))


def test_notebook_prints_the_recorded_figures():
    spreads, meta = load_record(RECORD)
    printed = recorded_cell_output()
    assert f"recorded: {meta['command']}" in printed
    for arm in ARMS:
        for key in (arm, f"{arm} merged", f"{arm} loss", f"{arm} merged loss"):
            assert str(spreads[key]) in printed, f"{key}: {spreads[key]} not in the notebook's output"
        trainable = {r["trainable"] for r in meta["rows"] if r["arm"] == arm}
        assert len(trainable) == 1 and f"{min(trainable):,}" in printed


def test_record_supports_the_notebooks_claims():
    _, meta = load_record(RECORD)
    rows = meta["rows"]
    qa = [r for r in rows if r["arm"] == "QA-LoRA"]
    lora = [r for r in rows if r["arm"] != "QA-LoRA"]
    assert len(qa) == 3 and len(lora) == 6, "3 seeds per arm"
    assert all(r["acc"] == r["acc_merged"] for r in qa)
    assert all(abs(r["answer_loss"] - r["answer_loss_merged"]) < 1e-5 for r in qa)
    assert all(r["answer_loss_merged"] > r["answer_loss"] for r in lora)
    assert max(r["merge_logit_change"] for r in qa) < 1e-3 < 1 < min(r["merge_logit_change"] for r in lora)
