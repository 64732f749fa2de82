"""`qlearn doctor`: is this machine ready for the course? Each check says OK or FAIL with a one-line fix.

Checks really exercise what the course needs (bitsandbytes quantizes and dequantizes a tensor, the
embedded model loads and predicts), not just that a package imports.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass

__all__ = ["Check", "run_checks", "report"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def line(self) -> str:
        status = "OK  " if self.ok else ("FAIL" if self.required else "WARN")
        text = f"{status}  {self.name:<14} {self.detail}"
        return text + (f"\n      fix: {self.fix}" if not self.ok and self.fix else "")


def _python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", ok, platform.python_version(), "install Python 3.10 or newer")


def _torch() -> Check:
    try:
        import torch
    except ImportError:
        return Check("torch", False, "not installed",
                     'pip install torch --index-url https://download.pytorch.org/whl/cpu  (CPU build)')
    return Check("torch", True, torch.__version__)


def _device() -> Check:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return Check("device", True, f"cuda: {p.name}, {p.total_memory / 2**30:.1f} GiB", required=False)
    return Check("device", True, "cpu (no CUDA GPU: notebook 09 shows recorded GPU results)", required=False)


def _bitsandbytes() -> Check:
    """Quantize and dequantize for real: NF4 blockwise and 8-bit blockwise round trips."""
    fix = 'pip install "bitsandbytes>=0.50"  (0.50+ runs 4-bit and 8-bit on the CPU)'
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        w = torch.linspace(-1, 1, 4096, device=device).reshape(64, 64)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        err4 = (F.dequantize_4bit(packed, state) - w).abs().max().item()
        q8, state8 = F.quantize_blockwise(w)
        err8 = (F.dequantize_blockwise(q8, state8) - w).abs().max().item()
    except Exception as err:  # any failure here means the course's 4-bit lessons cannot run
        return Check("bitsandbytes", False, f"{type(err).__name__}: {err}".splitlines()[0][:120], fix)
    ok = err4 < 0.1 and err8 < 0.01  # NF4 step near +-1 is ~0.15, so half of it; 8-bit ~1/127
    detail = f"{bnb.__version__} on {device}: nf4 round-trip error {err4:.3f}, 8-bit {err8:.4f}"
    return Check("bitsandbytes", ok, detail, fix)


def _library(name: str, fix: str) -> Check:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return Check(name, True, version(name))
    except PackageNotFoundError:
        return Check(name, False, "not installed", fix)


def _model() -> Check:
    fix = "run from a full clone of the course (data/tiny ships with it), or set QLEARN_DATA"
    try:
        import torch

        import qlearn

        model, tok = qlearn.load_model("tiny", device="cpu")
        ids = tok("The list type", return_tensors="pt").input_ids
        with torch.no_grad():
            ok = bool(torch.isfinite(model(ids).logits).all())
        n = sum(p.numel() for p in model.parameters())
    except Exception as err:
        return Check("model", False, f"{type(err).__name__}: {err}".splitlines()[0][:120], fix)
    return Check("model", ok, f"data/tiny loads: {n / 1e6:.1f}M parameters, finite logits", fix)


def run_checks() -> list[Check]:
    checks = [_python(), _torch()]
    if not checks[-1].ok:
        return checks
    fix = 'pip install -c constraints.txt -e ".[test,lab]"'
    return checks + [_device(), _bitsandbytes(), _library("transformers", fix), _library("peft", fix),
                     _library("accelerate", fix), _model()]


def report(checks: list[Check]) -> tuple[str, bool]:
    """The printed report and whether every required check passed."""
    ok = all(c.ok for c in checks if c.required)
    summary = "ready: every required check passed" if ok else "not ready: fix the FAIL lines above"
    return "\n".join([c.line() for c in checks] + [summary]), ok
