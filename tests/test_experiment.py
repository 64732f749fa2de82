"""qlearn.experiment: spreads over seeds, the "beats only beyond the spread" rule, records, printing."""

import configparser
import re
from pathlib import Path

import pytest

from qlearn.experiment import Spread, approx, load_record, over, record, verdict


def test_over_runs_every_seed_and_reports_mean_and_range():
    runs = over(lambda seed: 10.0 + seed, seeds=(0, 1, 2, 5), label="x")
    assert runs.values == (10.0, 11.0, 12.0, 15.0) and runs.mean == 12.0 and (runs.lo, runs.hi) == (10.0, 15.0)
    assert runs.width == 5.0 and runs.n == 4 and str(runs) == "x ~12.00 (~10.00..~15.00, 4 runs)"


def test_a_beats_b_only_when_every_run_of_a_beats_every_run_of_b():
    a, b = Spread((0.86, 0.84, 0.88), "A", True), Spread((0.80, 0.83, 0.81), "B", True)
    v = verdict(a, b)
    assert v.winner == "A" and not v.tie and v.distance == pytest.approx(0.01) and "A beats B" in v.text
    overlapping = Spread((0.86, 0.82, 0.88), "A", True)  # one run of A below B's best: a tie
    assert verdict(overlapping, b).tie and "tie" in verdict(overlapping, b).text
    assert verdict(b, a).winner == "A"  # the same rule from the other side
    assert verdict(a, b, margin=0.02).tie  # a claim that must survive another machine keeps a margin


def test_lower_is_better_mirrors_the_rule():
    gptq, rtn = Spread((16.1, 16.0, 16.2), "GPTQ"), Spread((16.5, 16.6, 16.4), "RTN")
    assert verdict(gptq, rtn, higher_is_better=False).winner == "GPTQ"
    assert verdict(gptq, rtn).winner == "RTN"  # read as "higher is better", RTN's perplexity "wins"


def test_record_and_load_round_trip(tmp_path: Path):
    spreads = {"lora": Spread((0.8, 0.9), "LoRA", True), "qlora": Spread((0.7, 0.85), "QLoRA", True)}
    data = record(tmp_path / "r.json", spreads, command="python benchmarks/x.py", steps=100)
    loaded, meta = load_record(tmp_path / "r.json")
    assert loaded == spreads and meta == {"command": "python benchmarks/x.py", "steps": 100}
    assert data["spreads"]["lora"]["mean"] == pytest.approx(0.85)


def test_printed_numbers_are_marked_and_the_sanitizer_masks_exactly_those():
    cfg = configparser.RawConfigParser()
    cfg.read(Path(__file__).parent / "sanitize.cfg")
    section = next(s for s in cfg.sections() if s.startswith("float-sensitive numbers"))
    mask = lambda text: re.sub(cfg[section]["regex"], cfg[section]["replace"], text)  # noqa: E731
    assert approx(16.0912) == "~16.09" and approx(0.826, percent=True) == "~83%" and approx(3e-7, ".0e") == "~3e-07"
    assert mask("GPTQ ~16.09 vs RTN ~16.53 at 3.5 bits, ~7,273,216 grads, ~-1.5e-03") == \
        "GPTQ ~# vs RTN ~# at 3.5 bits, ~# grads, ~#"  # 3.5 (exact bits) stays compared
    assert mask(str(Spread((0.8, 0.86), "LoRA", True))) == "LoRA ~# (~#..~#, 2 runs)"


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="values must hold at least one result"):
        Spread(())
    with pytest.raises(ValueError, match="values must be finite"):
        Spread((1.0, float("nan")))
    with pytest.raises(ValueError, match="seeds must be a non-empty list of non-negative ints"):
        over(lambda s: 1.0, seeds=())
    with pytest.raises(TypeError, match="a and b must be Spread objects"):
        verdict(1.0, Spread((1.0,)))
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        verdict(Spread((1.0,)), Spread((1.0,)), margin=-1)
