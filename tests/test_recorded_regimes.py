"""benchmarks/cpu/regimes_sweep.json (benchmarks/regimes_sweep.py): the record gives every regime the same budget
and a learning rate from its stated grid, notebook 06 trains at the record's learning rates and displays the
record's figures, and (opt-in, `-m slow`) a re-run of one recorded LoRA run lands within the recorded spread."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest

from qlearn.experiment import load_record

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "benchmarks" / "cpu" / "regimes_sweep.json"
NOTEBOOK = ROOT / "notebooks" / "06_fine_tuning_regimes.ipynb"
KINDS = ("full", "freeze", "lora", "adapter", "prompt")
pytestmark = pytest.mark.skipif(not RECORD.exists(), reason="benchmarks/cpu/regimes_sweep.json is not recorded yet: "
                                "run `python benchmarks/regimes_sweep.py --workers 2` (it resumes from its cache)")


def _cells(marker: str) -> list[dict]:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if c["cell_type"] == "code" and marker in "".join(c["source"])]
    assert len(cells) == 1, f"{len(cells)} code cells of notebook 06 contain {marker!r}"
    return cells


def _cell_output(marker: str) -> str:
    return "".join("".join(o["text"]) for o in _cells(marker)[0]["outputs"] if o["output_type"] == "stream")


def test_record_gives_every_regime_the_same_budget_and_a_swept_lr():
    spreads, meta = load_record(RECORD)
    assert meta["command"] == "python benchmarks/regimes_sweep.py"
    budget = meta["budget"]
    assert budget["steps"] >= 40 and budget["warmup"] == budget["steps"] // 10 and budget["batch"] == 16
    assert "fp32" in meta["model"] or "float32" in meta["model"]
    seeds = meta["seeds"]
    assert len(seeds) >= 3
    for kind in KINDS:
        grid = meta["lr_sweep"]["runs"][kind]
        assert len(grid) >= 3, f"{kind}: an lr grid of {len(grid)} points"
        assert f"{meta['lr'][kind]:g}" in grid, f"{kind}: the chosen lr {meta['lr'][kind]} is not in its grid"
        for metric in ("dev", "test", "loss"):
            assert spreads[f"{kind}_{metric}"].n == len(seeds)
    for r in (*meta["rank_sweep"]["ranks"], 8):
        for scaling in ("alpha/r", "alpha/sqrt(r)"):
            assert spreads[f"rank_{scaling}_r{r}_test"].n == len(meta["rank_sweep"]["seeds"]) >= 2
    assert {"torch", "transformers", "qlearn", "processor"} <= set(meta["machine"])


def test_notebook_trains_at_the_recorded_learning_rates():
    _, meta = load_record(RECORD)
    source = "".join(_cells("LR = {")[0]["source"])
    line = next(ln for ln in source.splitlines() if ln.startswith("LR = {"))
    assert ast.literal_eval(line.split("=", 1)[1].strip()) == meta["lr"]


def test_notebook_shows_the_recorded_figures():
    """Every recorded figure the notebook prints appears in the committed output of the cells that read the
    record, formatted from the JSON (a re-run of the sweep must be followed by a re-run of the notebook)."""
    spreads, meta = load_record(RECORD)
    table = _cell_output("# the recorded sweep")
    for kind in KINDS:
        shown = spreads[f"{kind}_test"].format()
        assert shown in table, f"{kind}: {shown} is not in the notebook's recorded table"
    ranks = _cell_output("# the recorded rank sweep")
    for r in (*meta["rank_sweep"]["ranks"], 8):
        for scaling in ("alpha/r", "alpha/sqrt(r)"):
            shown = spreads[f"rank_{scaling}_r{r}_test"].format()
            assert shown in ranks, f"r={r} {scaling}: {shown} is not in the notebook"


def _benchmark():
    spec = importlib.util.spec_from_file_location("regimes_sweep", ROOT / "benchmarks" / "regimes_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_rerun_of_recorded_lora_lands_in_the_recorded_spread():
    """LoRA at its chosen lr, seed 0 (about a CPU minute): its test score within the spread over seeds, widened
    by one test example (another CPU's float sums may flip one greedy answer)."""
    import torch

    import qlearn
    from qlearn import tasks

    torch.set_num_threads(1)  # the record's set-up
    spreads, meta = load_record(RECORD)
    sweep = _benchmark()
    base, tok = qlearn.load_model("tiny", device="cpu", dtype=torch.float32)
    base.requires_grad_(False)
    spec = dict(kind="lora", lr=meta["lr"]["lora"], seed=0, r=8, scaling="alpha/r")
    run = sweep.train_one(spec, base, tok, tasks.load(sweep.TASK))
    recorded, slack = spreads["lora_test"], 1 / 100
    assert recorded.lo - slack <= run["test"] <= recorded.hi + slack, \
        f"re-run {run['test']:.0%} outside the recorded {recorded.lo:.0%}..{recorded.hi:.0%} (+-1 example)"
