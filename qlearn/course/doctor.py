"""`qlearn doctor`: is this machine ready for the course? One line per check, OK or FAIL (WARN for
what is optional), and under each failure a one-line fix.

The checks exercise what the course needs instead of only importing it: bitsandbytes quantizes and
dequantizes a tensor in NF4 (4-bit, blocks of 64) and in LLM.int8's row-wise int8, and each error
stays within half a quantization step (the most rounding to the nearest code can lose):
    NF4    |x - x̂| <= absmax_block * g / 2, g = 0.3038 the widest gap of the NF4 code book (-1 to -0.6962)
    int8   |x - x̂| <= absmax_row / 127 / 2 (+ half an fp16 ulp: LLM.int8 takes fp16 input)
and the embedded model (data/tiny) loads and gives finite logits.

    from qlearn.course.doctor import run_checks, report
    text, ok = report(run_checks())
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .conventions import REPO, SETUP_COMMAND

__all__ = ["NF4_WIDEST_GAP", "Check", "report", "run_checks"]

SETUP = SETUP_COMMAND
CUDA_TORCH = "pip install --force-reinstall torch==2.13.0 --index-url https://pypi.org/simple"
NF4_WIDEST_GAP = 1.0 - 0.6961928009986877  # between the NF4 code book's -1 and -0.6962 (QLoRA, Appendix E)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    @property
    def status(self) -> str:
        return "OK" if self.ok else ("FAIL" if self.required else "WARN")

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<13} {self.detail}"
        return text + (f"\n      fix: {self.fix}" if not self.ok and self.fix else "")


def _first_line(err: Exception) -> str:
    return (f"{type(err).__name__}: {err}".strip().splitlines() or [""])[0][:160]


def _python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", ok, f"{platform.python_version()} ({sys.executable})",
                 "install Python 3.10 or newer and make a new virtual environment with it")


def _torch() -> Check:
    try:
        import torch
    except ImportError:
        return Check("torch", False, "not installed", SETUP)
    return Check("torch", True, f"{torch.__version__} ({torch.get_num_threads()} CPU threads)")


def _nvidia_gpu() -> str:
    """Where this machine shows an NVIDIA GPU (its driver, or nvidia-smi), or "" when it shows none."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return str(gpus)
    return shutil.which("nvidia-smi") or ""


def _device() -> Check:
    import torch

    if not torch.cuda.is_available():
        gpu = _nvidia_gpu()
        if torch.version.cuda is None and gpu:  # e.g. the README's CPU index on a machine with a GPU
            return Check("device", False, f"cpu: torch {torch.__version__} is a CPU build, but this machine has "
                                          f"an NVIDIA GPU ({gpu})",
                         f"for the GPU: {CUDA_TORCH}  (PyPI's Linux build includes CUDA; other CUDA "
                         "versions: pytorch.org)", required=False)
        return Check("device", True, "cpu (no CUDA GPU: every notebook runs; notebook 10 shows recorded GPU "
                                     "results)", required=False)
    try:
        p = torch.cuda.get_device_properties(0)
        (torch.ones(4, device="cuda") * 2).sum().item()  # the GPU really computes
    except Exception as err:  # noqa: BLE001 -- any CUDA error means the GPU is unusable; report it
        return Check("device", False, f"cuda: {_first_line(err)}",
                     "the CUDA driver and torch's CUDA build disagree: install the torch build for your driver "
                     "(pytorch.org), or run on the CPU with QLEARN_DEVICE=cpu")
    return Check("device", True, f"cuda: {p.name}, {p.total_memory / 2**30:.1f} GiB", required=False)


def _bitsandbytes() -> Check:
    fix = 'pip install -c constraints.txt "bitsandbytes>=0.50"  (0.50+ runs 4-bit and 8-bit on the CPU too)'
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(64, 128, generator=gen).to(device)  # 64 rows, 128 blocks of 64
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        err4 = (F.dequantize_4bit(packed, state) - w).abs()
        bound4 = w.reshape(-1, 64).abs().amax(1, keepdim=True) * NF4_WIDEST_GAP / 2 + 1e-6  # + fp32 rounding
        w16 = w.half()  # LLM.int8 quantizes fp16 activations and weights (its CUDA kernel accepts nothing else)
        q8, row_scale, _ = F.int8_vectorwise_quant(w16)
        err8 = (F.int8_vectorwise_dequant(q8, row_scale).float() - w16.float()).abs()
        # half a step of 127 per row, + half an fp16 ulp where the result comes back in fp16
        bound8 = w16.float().abs().amax(1, keepdim=True) / 127 / 2 + w16.float().abs() * 2**-11 + 1e-6
    except Exception as err:  # noqa: BLE001 -- any failure here means the course's 4-bit and 8-bit lessons cannot run
        return Check("bitsandbytes", False, _first_line(err), fix)
    ok = bool((err4.reshape(-1, 64) <= bound4).all() and (err8 <= bound8).all() and q8.dtype == torch.int8
              and packed.numel() == w.numel() // 2)  # two 4-bit codes per byte
    detail = (f"{bnb.__version__} on {device}: nf4 max error {err4.max().item():.3f} "
              f"(bound {bound4.max().item():.3f}), int8 max error {err8.max().item():.4f} "
              f"(bound {bound8.max().item():.4f})")
    return Check("bitsandbytes", ok, detail, fix + " -- the round trip exceeded half a quantization step" * (not ok))


def _library(name: str, required: bool = True, fix: str = SETUP) -> Check:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return Check(name, True, version(name), required=required)
    except PackageNotFoundError:
        return Check(name, False, "not installed", fix, required=required)


def _model() -> Check:
    from ..paths import data_dir

    where = data_dir() / "tiny"
    if "QLEARN_DATA" in os.environ:
        fix = f"QLEARN_DATA={os.environ['QLEARN_DATA']} has no usable tiny/: unset QLEARN_DATA or point it at the course's data/"
    else:
        fix = f"data/tiny ships with the course: run from a full clone (git clone https://github.com/{REPO})"
    if not (where / "config.json").is_file():
        return Check("model", False, f"missing: {where} has no config.json", fix)
    try:
        import torch

        from ..models import load_model

        model, tok = load_model("tiny", device="cpu")
        ids = tok("The list type", return_tensors="pt").input_ids
        with torch.no_grad():
            finite = bool(torch.isfinite(model(ids).logits).all())
        n = sum(p.numel() for p in model.parameters())
    except Exception as err:  # noqa: BLE001 -- whatever breaks loading, the fix is the same
        return Check("model", False, f"{where}: {_first_line(err)}", fix)
    return Check("model", finite, f"{where} loads: {n / 1e6:.1f}M parameters, finite logits",
                 fix + " (the logits were not finite: the weights are damaged)")


def run_checks() -> list[Check]:
    """Every check, in the order printed; stops after torch when torch is missing."""
    checks = [_python(), _torch()]
    if not checks[-1].ok:
        return checks
    return checks + [
        _device(), _bitsandbytes(), _library("transformers"), _library("peft"), _library("accelerate"),
        _model(),
        _library("jupyterlab", required=False, fix='pip install -c constraints.txt -e ".[lab]"  (for qlearn lab)'),
        _library("nbval", required=False, fix=f'{SETUP}  (for the tests)'),
    ]


def report(checks: list[Check]) -> tuple[str, bool]:
    """The printed report and whether every required check passed."""
    ok = all(c.ok for c in checks if c.required)
    summary = "ready: every required check passed" if ok else "not ready: fix the FAIL lines above"
    return "\n".join([c.line() for c in checks] + [summary]), ok
