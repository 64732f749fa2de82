"""Exercise checkers: run the learner's function on fixed small cases with known answers and say
what was expected, what came back, and a hint about the usual mistake.

Each notebook has its checkers in `qlearn.check.nbNN` (e.g. `qlearn.check.nb02.symmetric_scale`).
A checker never raises: it prints one line that starts with a status word, so that the notebook
keeps running after a skipped exercise and `qlearn exercises check` can read the results:

    [qlearn.check] PASSED 2.1 symmetric scale
    [qlearn.check] FAILED 2.1 symmetric scale: expected 0.0236, got 0.0472. Hint: ...
    [qlearn.check] NOT ATTEMPTED 2.1 symmetric scale: the stub still raises NotImplementedError

and returns a `CheckResult` (its `.passed` is what a test asserts).

Writing a checker:

    def symmetric_scale(fn):
        with exercise("2.1", "symmetric scale") as ex:
            got = fn(torch.tensor([-2.0, 1.0]), bits=8)
            ex.close(got, 2.0 / 127, atol=1e-7, hint="divide absmax by 2**(bits-1) - 1, not 2**bits")
        return ex.result
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["PREFIX", "CheckFailed", "CheckResult", "Exercise", "exercise"]

PREFIX = "[qlearn.check]"
STATUSES = ("PASSED", "FAILED", "NOT ATTEMPTED")


@dataclass
class CheckResult:
    number: str
    title: str
    status: str  # one of STATUSES
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "PASSED"

    def line(self) -> str:
        text = f"{PREFIX} {self.status} {self.number} {self.title}"
        return f"{text}: {self.message}" if self.message else text

    def _ipython_display_(self) -> None:  # the printed line is the display: no empty `Out[n]:` after it
        pass


class CheckFailed(AssertionError):
    """Raised inside an `exercise` block by a failed expectation; caught by the block."""


def _fmt(x) -> str:
    if isinstance(x, torch.Tensor):
        if x.numel() <= 8:
            return str([round(v, 6) if isinstance(v, float) else v for v in x.flatten().tolist()])
        return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    if isinstance(x, float):
        return f"{x:.6g}"
    return repr(x)


class Exercise:
    """The expectations a checker states; each failed one raises CheckFailed with a teaching message."""

    def __init__(self, number: str, title: str):
        self.number, self.title = number, title
        self.result: CheckResult | None = None

    def fail(self, message: str, hint: str | None = None) -> None:
        raise CheckFailed(message + (f"{'' if message.endswith('.') else '.'} Hint: {hint}" if hint else ""))

    def true(self, condition: bool, message: str, hint: str | None = None) -> None:
        if not condition:
            self.fail(message, hint)

    def equal(self, got, expected, what: str = "the result", hint: str | None = None) -> None:
        """Exact equality (integer codes, shapes, dtypes, counts)."""
        if isinstance(expected, torch.Tensor):
            self.tensor_like(got, expected, what, hint)
            if not torch.equal(got, expected):
                bad = (got != expected).nonzero()[0].tolist()
                self.fail(f"{what}: expected {_fmt(expected)}, got {_fmt(got)} "
                          f"(first difference at index {bad})", hint)
        elif got != expected:
            self.fail(f"{what}: expected {_fmt(expected)}, got {_fmt(got)}", hint)

    def close(self, got, expected, what: str = "the result", atol: float = 1e-6, rtol: float = 1e-5,
              hint: str | None = None) -> None:
        """Float agreement within atol + rtol * |expected| (the tolerance each checker justifies)."""
        if isinstance(expected, torch.Tensor):
            self.tensor_like(got, expected, what, hint)
            got_f, exp_f = got.detach().double(), expected.detach().double()
            if not torch.isfinite(got_f).all():
                self.fail(f"{what} contains NaN or inf", hint)
            err = (got_f - exp_f).abs()
            tol = atol + rtol * exp_f.abs()
            if (err > tol).any():
                i = int((err - tol).flatten().argmax())
                self.fail(f"{what}: expected {_fmt(expected)}, got {_fmt(got)} (largest miss at flat "
                          f"index {i}: {got_f.flatten()[i].item():.6g} vs {exp_f.flatten()[i].item():.6g})",
                          hint)
        else:
            try:
                g = float(got)
            except (TypeError, ValueError):
                self.fail(f"{what}: expected a number, got {type(got).__name__}", hint)
            if not math.isfinite(g) or abs(g - expected) > atol + rtol * abs(expected):
                self.fail(f"{what}: expected {_fmt(float(expected))}, got {_fmt(g)}", hint)

    def tensor_like(self, got, expected: torch.Tensor, what: str = "the result", hint: str | None = None):
        if not isinstance(got, torch.Tensor):
            self.fail(f"{what}: expected a torch.Tensor, got {type(got).__name__}", hint)
        if tuple(got.shape) != tuple(expected.shape):
            self.fail(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}", hint)


@contextmanager
def exercise(number: str, title: str):
    """Run a checker's body; turn its outcome into one printed line and `ex.result`."""
    ex = Exercise(number, title)
    try:
        yield ex
    except NotImplementedError:
        ex.result = CheckResult(number, title, "NOT ATTEMPTED",
                                "the stub still raises NotImplementedError; the rest of the notebook runs on")
    except CheckFailed as err:
        ex.result = CheckResult(number, title, "FAILED", str(err))
    except Exception as err:  # the learner's code crashed: say how, keep the notebook going
        ex.result = CheckResult(number, title, "FAILED",
                                f"your code raised {type(err).__name__}: {err}")
    else:
        ex.result = CheckResult(number, title, "PASSED")
    print(ex.result.line())


def __getattr__(name: str):
    """`qlearn.check.nb02` imports the notebook's checker module on first use."""
    if name.startswith("nb") and name[2:].isdigit():
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
