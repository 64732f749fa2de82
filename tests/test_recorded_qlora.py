"""benchmarks/cpu/qlora_vs_lora.json (benchmarks/qlora_vs_lora.py): the record holds its configurations with their
budgets, notebook 07's markdown shows the record's figures and the verdict they support, and (opt-in, `-m slow`)
a reduced re-run of the sweep lands within the recorded spread."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qlearn.experiment import Spread, load_record, verdict

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "benchmarks" / "cpu" / "qlora_vs_lora.json"
NOTEBOOK = ROOT / "notebooks" / "07_qlora.ipynb"
# How far one run's scores may move with the CPU's arithmetic (another kernel set, another CPU) beyond the
# recorded min..max over seeds: a re-run of seed 0 is compared within the spread widened by this much.
DRIFT = {"exact": 0.02, "token_acc": 0.005, "answer_loss": 0.02}
HEADLINE = [("exact", "exact match (greedy decoding)", True), ("token_acc", "answer tokens right", True),
            ("answer_loss", "answer loss", False)]


def shown(s: Spread) -> str:
    """A recorded figure as notebook 07 shows it: mean (min..max), plainly (read from the file)."""
    if s.percent:
        return f"{100 * s.mean:.1f}% ({100 * s.lo:.1f}..{100 * s.hi:.1f}%)"
    return f"{s.mean:.3f} ({s.lo:.3f}..{s.hi:.3f})"


def outcome(a: Spread, b: Spread, higher: bool) -> str:
    v = verdict(a, b, higher_is_better=higher)
    return "tie" if v.tie else f"{v.winner} better"


def table_rows(spreads: dict, pairs: list[tuple[str, str, str, str]]) -> list[str]:
    """Markdown rows `| what | A | B | verdict |` for (key A, key B, name A, name B) over the HEADLINE scores."""
    rows = []
    for key_a, key_b, name_a, name_b in pairs:
        for key, what, higher in HEADLINE:
            if f"{key_a}/{key}" not in spreads:
                continue
            a, b = spreads[f"{key_a}/{key}"], spreads[f"{key_b}/{key}"]
            a, b = Spread(a.values, name_a, a.percent), Spread(b.values, name_b, b.percent)
            rows.append(f"| {what} | {shown(a)} | {shown(b)} | {outcome(a, b, higher)} |")
    return rows


def _markdown() -> str:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def test_record_holds_its_configurations_and_budgets():
    spreads, meta = load_record(RECORD)
    head = meta["headline"]
    assert meta["command"] == "python benchmarks/qlora_vs_lora.py"
    assert {"torch", "transformers", "peft", "bitsandbytes", "qlearn", "processor"} <= set(meta["machine"])
    # equal budgets: both methods the same steps, lr, schedule and seeds, scored on the whole test split
    assert len(head["seeds"]) >= 3 and head["test_examples"] == 200 and head["steps"] == 80
    for method in ("lora", "qlora"):
        for key, _, _ in HEADLINE:
            assert spreads[f"headline/{method}/{key}"].n == len(head["seeds"])
        assert len(head["curves"][method]) == len(head["seeds"])
        assert all(len(curve) == head["steps"] for curve in head["curves"][method])
    if "kbit" in meta:
        kbit = meta["kbit"]
        assert len(kbit["seeds"]) >= 3 and kbit["test_examples"] == 200
        for label in kbit["configs"]:
            assert spreads[f"kbit/{label}/answer_loss"].n == len(kbit["seeds"])
            assert spreads[f"kbit/{label}/init_ppl"].n == 1  # deterministic: one run


def test_notebook_shows_the_recorded_figures_and_their_verdict():
    """The notebook's markdown table holds every recorded headline figure, formatted from the JSON, with the
    verdict (every run beats every run, else a tie) computed from the record."""
    spreads, meta = load_record(RECORD)
    text = _markdown()
    pairs = [("headline/qlora", "headline/lora", "QLoRA", "LoRA")]
    if "kbit/loftq2_5/answer_loss" in spreads and "kbit/rtn2/answer_loss" in spreads:
        pairs.append(("kbit/loftq2_5", "kbit/rtn2", "LoftQ", "QLoRA's init"))
    for row in table_rows(spreads, pairs):
        assert row in text, f"the notebook's markdown lacks the recorded row {row!r}"
    assert f"{len(meta['headline']['seeds'])} seeds" in text


def _benchmark():
    spec = importlib.util.spec_from_file_location("qlora_vs_lora", ROOT / "benchmarks" / "qlora_vs_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_reduced_sweep_lands_in_the_recorded_spread(request):
    """LoRA and QLoRA (80 steps, seed 0) re-run: each score within the recorded min..max over seeds, widened by
    DRIFT. About 2 CPU-minutes."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: re-runs part of benchmarks/qlora_vs_lora.py (about 2 CPU-minutes); run with -m slow")
    bench = _benchmark()
    spreads, _ = load_record(RECORD)
    base, tok = bench.setup()
    for method in ("lora", "qlora"):
        run = bench.headline_run(base, tok, method, 0)
        for kind, _, _ in HEADLINE:
            s = spreads[f"headline/{method}/{kind}"]
            assert s.lo - DRIFT[kind] <= run[kind] <= s.hi + DRIFT[kind], \
                f"{method} {kind}: re-run {run[kind]:.4f} outside the recorded {s.lo:.4f}..{s.hi:.4f} (+-{DRIFT[kind]})"
