"""Comparisons beyond the noise: run one configuration over several seeds (or calibration draws),
report its mean and spread, and claim "A beats B" only when the runs say so.

A single training run or calibrated search is one draw from a distribution: another seed, another
set of calibration windows or another CPU (whose float sums round differently) gives another
number. So a comparison runs each side k times,

    Spread(values):  mean = (1/k) sum v_i,   spread = [min v_i, max v_i]

and decides with the most conservative rule that still reads naturally:

    A beats B   when every run of A is better than every run of B, by more than `margin`:
                min(A) - max(B) > margin      (higher is better; mirrored when lower is better)
    tie         otherwise: the gap of the means is within what a change of seed moves.

`margin` is the extra distance a claim must keep to survive another machine (the drift of a
float-sensitive number across CPUs, measured once and stated where it is used).

    runs = over(lambda seed: train_and_score(seed), seeds=(0, 1, 2), label="LoRA")
    print(runs)                        # LoRA 83% (80..86%, 3 seeds)
    verdict(runs_a, runs_b).text       # "LoRA and QLoRA tie: ..." or "LoRA beats QLoRA: ..."

`plot_spreads` draws means with their min..max range. Sweeps too slow for a notebook are run by a
script in benchmarks/ that writes `record(...)`'s JSON; the notebook reads it with `load_record`.

Printing (the course's output convention): a number whose last digits depend on the machine (after
training, a calibrated search, float accumulation) is printed with a leading "~", e.g. "~83%". The
tests' sanitizer (tests/sanitize.cfg) masks "~<number>", so committed notebook outputs re-check on any
CPU, while the assert beside the print guards the claim with a tolerance that carries the numbers.
`approx(x)` formats one such number; Spread and Verdict print theirs that way.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Spread", "Verdict", "approx", "load_record", "over", "plot_spreads", "record", "verdict"]


def approx(x: float, spec: str = ".2f", percent: bool = False) -> str:
    """'~16.09' (or '~83%' with percent=True, x in [0, 1]): a float-sensitive number, marked as such."""
    if percent:
        return f"~{100 * x:{'.0f' if spec == '.2f' else spec}}%"
    return f"~{x:{spec}}"


@dataclass(frozen=True)
class Spread:
    """The results of one configuration over several seeds or draws."""

    values: tuple[float, ...]
    label: str = ""
    percent: bool = False  # print values in [0, 1] as percentages

    def __post_init__(self):
        values = tuple(float(v) for v in self.values)
        if not values:
            raise ValueError("values must hold at least one result")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"values must be finite, got {values}")
        object.__setattr__(self, "values", values)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    @property
    def width(self) -> float:
        """max - min: how far a change of seed moved the result."""
        return self.hi - self.lo

    def format(self, digits: int = 2) -> str:
        """'~83% (~80..~86%, 3 runs)' or '~16.09 (~15.97..~16.21, 3 runs)' ("~": see the module docstring)."""
        spec = f".{max(0, digits - 2)}f" if self.percent else f".{digits}f"
        f = lambda v: approx(v, spec, self.percent)  # noqa: E731
        return f"{f(self.mean)} ({f(self.lo)}..{f(self.hi)}, {self.n} runs)"

    def __str__(self) -> str:
        return (f"{self.label} " if self.label else "") + self.format()

    def as_dict(self) -> dict:
        return {"label": self.label, "values": list(self.values), "mean": self.mean, "lo": self.lo,
                "hi": self.hi, "percent": self.percent}


@dataclass(frozen=True)
class Verdict:
    """The outcome of `verdict`: who wins (None for a tie), the gap of the means, and a sentence."""

    winner: str | None
    gap: float      # mean(A) - mean(B), signed so that > 0 favours A
    distance: float  # min(A) - max(B) (higher is better; mirrored otherwise): > margin means A beats B
    text: str

    @property
    def tie(self) -> bool:
        return self.winner is None


def over(fn: Callable[[int], float], seeds: Iterable[int] = (0, 1, 2), *, label: str = "",
         percent: bool = False) -> Spread:
    """Run `fn(seed)` for every seed and collect the results in a Spread."""
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {seeds!r}")
    return Spread(tuple(fn(s) for s in seeds), label, percent)


def verdict(a: Spread, b: Spread, *, higher_is_better: bool = True, margin: float = 0.0) -> Verdict:
    """"A beats B" when min(A) - max(B) > margin (higher is better), "B beats A" mirrored, else a tie."""
    if not isinstance(a, Spread) or not isinstance(b, Spread):
        raise TypeError("a and b must be Spread objects (from qlearn.experiment.over)")
    if not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    sign = 1 if higher_is_better else -1
    name_a, name_b = a.label or "A", b.label or "B"
    gap = sign * (a.mean - b.mean)
    a_over_b = sign * (a.lo - b.hi) if higher_is_better else sign * (a.hi - b.lo)
    b_over_a = sign * (b.lo - a.hi) if higher_is_better else sign * (b.hi - a.lo)
    fmt = (lambda v: f"~{100 * v:.0f} points") if a.percent else (lambda v: f"~{v:.3g}")  # noqa: E731
    if a_over_b > margin:
        return Verdict(name_a, gap, a_over_b, f"{name_a} beats {name_b} by {fmt(abs(gap))} "
                       f"(every run of {name_a} better than every run of {name_b})")
    if b_over_a > margin:
        return Verdict(name_b, gap, a_over_b, f"{name_b} beats {name_a} by {fmt(abs(gap))} "
                       f"(every run of {name_b} better than every run of {name_a})")
    return Verdict(None, gap, a_over_b, f"{name_a} and {name_b} tie: the means differ by {fmt(abs(gap))}, "
                   f"within the spread of their runs")


def plot_spreads(ax, xs, spreads: list[Spread], label: str | None = None, **kwargs):
    """Means joined by a line, each with its min..max range as an error bar; returns the axis."""
    spreads = list(spreads)
    scale = 100 if spreads and spreads[0].percent else 1
    means = [scale * s.mean for s in spreads]
    low = [scale * (s.mean - s.lo) for s in spreads]
    high = [scale * (s.hi - s.mean) for s in spreads]
    ax.errorbar(list(xs), means, yerr=[low, high], capsize=3, marker=kwargs.pop("marker", "o"),
                label=label, **kwargs)
    return ax


def record(path: str | Path, spreads: dict[str, Spread], **meta) -> dict:
    """Write spreads (and metadata such as the command, budgets and versions) as JSON; return it."""
    data = {"meta": meta, "spreads": {k: s.as_dict() for k, s in spreads.items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    return data


def load_record(path: str | Path) -> tuple[dict[str, Spread], dict]:
    """The spreads and metadata of a `record` file."""
    data = json.loads(Path(path).read_text())
    spreads = {k: Spread(tuple(d["values"]), d.get("label", k), d.get("percent", False))
               for k, d in data["spreads"].items()}
    return spreads, data.get("meta", {})
