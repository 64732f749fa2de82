"""Activation quantization: int8 (or b-bit) inputs of the linear layers, simulated, and W8A8.

Weights are quantized once; activations change with every input, so their scale is either computed on
the fly from the batch (dynamic) or fixed beforehand from calibration data (static). Symmetric
absmax grids with b bits (q_max = 2^(b-1) - 1, 127 for int8):

    per-tensor   s   = max_{t,j} |x_tj| / q_max             one scale for the whole batch
    per-token    s_t = max_j |x_tj| / q_max                  one scale per row (token) of x
    static       s   = max over calibration batches of max |x| / q_max   (per-tensor, fixed)

    x_hat = s * clamp(round(x / s), -q_max, q_max)           (x / s computed as x * (1 / s), as torch does)

Per-token scales fit int8 matrix multiplication (a row scale of X and a column scale of W factor out of
the sum: Y_ti = s_t r_i sum_j q_tj c_ij); per-channel scales of X would not (they sit inside the sum),
which is why an outlier *channel* is hard and an outlier *token* is not. A static scale saturates:
values beyond the calibrated range are clamped to +-q_max. There is no static per-token scale (the
tokens of the next batch are not known in advance).

`simulate(model, w_bits=8, a_bits=8)` is W8A8 in simulation (fake quantization): inside the `with`
block every selected linear layer's weight holds its quantized values (symmetric, per output channel
by default, `qlearn.quant.linear.quantize`) and a forward pre-hook rounds its input to the activation
grid; on exit the weights and hooks are put back exactly as they were. `a_bits=None` or `w_bits=None`
leaves that side in full precision (W4A16, W16A8, ...). `calibrate(model, calib)` gives the static scales.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .. import modules
from ..outliers import channel_absmax
from . import linear

__all__ = ["GRANULARITIES", "absmax_scale", "calibrate", "fake_quantize", "simulate"]

GRANULARITIES = ("per_tensor", "per_token")
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
SCALE_FLOOR = linear.SCALE_FLOOR  # an all-zero input gets a tiny scale and codes 0, not 0 / 0


def _check_bits(bits, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be an int in 2..8 (or None for full precision), got {bits!r}")
    return 2 ** (bits - 1) - 1


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def absmax_scale(x: Tensor, bits: int = 8, granularity: str = "per_tensor") -> Tensor:
    """s = max |x| / q_max over the whole tensor (0-d) or over each token's features ((..., 1))."""
    q_max = _check_bits(bits)
    _check_granularity(granularity)
    a = x.detach().abs().float()
    absmax = a.amax() if granularity == "per_tensor" else a.amax(dim=-1, keepdim=True)
    return (absmax / q_max).clamp(min=SCALE_FLOOR)


def fake_quantize(x: Tensor, bits: int = 8, granularity: str = "per_tensor", scale: Tensor | None = None) -> Tensor:
    """x_hat = s * clamp(round(x / s), -q_max, q_max) (module docstring), in x's dtype.

    scale=None: dynamic, from x itself (`absmax_scale`); else a static scale (0-d, or broadcastable to
    x: e.g. from `calibrate`), and values beyond its range saturate."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    q_max = _check_bits(bits)
    s = absmax_scale(x, bits, granularity) if scale is None else scale.float()
    q = torch.clamp(torch.round(x.float() * (1.0 / s)), -q_max, q_max)
    return (q * s).to(x.dtype)


@torch.no_grad()
def calibrate(model: nn.Module, calib: Tensor, bits: int = 8, *, targets=None,
              exclude=("lm_head",)) -> dict[str, Tensor]:
    """Static per-tensor scales {layer name: 0-d tensor}: max over the calibration tokens of |x| / q_max
    for the input of every selected linear layer (`qlearn.outliers.channel_absmax`, then the max)."""
    q_max = _check_bits(bits)
    return {name: (a.max() / q_max).clamp(min=SCALE_FLOOR)
            for name, a in channel_absmax(model, calib, targets=targets, exclude=exclude).items()}


@contextmanager
def simulate(model: nn.Module, w_bits: int | None = 8, a_bits: int | None = 8, *,
             granularity: str = "per_tensor", scales: dict[str, Tensor] | None = None,
             w_granularity: str = "per_channel", targets=None, exclude=("lm_head",)):
    """`with simulate(model, 8, 8) as m:` runs m as W{w_bits}A{a_bits} (fake quantization) on every
    nn.Linear that `qlearn.modules.linear_layers(model, targets, exclude)` selects; afterwards the model
    is exactly as before.

    granularity    activations: "per_tensor" or "per_token" (dynamic scales from each batch)
    scales         static activation scales from `calibrate` (per-tensor; one per selected layer)
    w_granularity  weights: "per_channel" (one scale per output row, the usual choice) or "per_tensor"
    """
    if w_bits is None and a_bits is None:
        raise ValueError("w_bits and a_bits are both None: nothing to quantize")
    if w_bits is not None:
        _check_bits(w_bits, "w_bits")
    if a_bits is not None:
        _check_bits(a_bits, "a_bits")
    _check_granularity(granularity)
    if w_granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"w_granularity must be one of {WEIGHT_GRANULARITIES}, got {w_granularity!r}")
    layers = modules.linear_layers(model, targets, exclude)
    if not layers:
        raise ValueError("no linear layer selected: check targets and exclude")
    if scales is not None:
        if granularity != "per_tensor":
            raise ValueError("static scales are per-tensor: a per-token scale cannot be calibrated in advance "
                             "(pass granularity='per_tensor' with scales, or scales=None for dynamic per-token)")
        missing = [n for n in layers if n not in scales]
        if missing:
            raise ValueError(f"scales has no entry for {len(missing)} selected layers (e.g. {missing[0]}): "
                             "calibrate with the same targets and exclude")

    def make_hook(name):
        scale = None if scales is None else scales[name]

        def hook(module, args):
            return (fake_quantize(args[0], a_bits, granularity, scale), *args[1:])
        return hook

    originals, handles = {}, []
    try:
        with torch.no_grad():
            for name, m in layers.items():
                if w_bits is not None:
                    originals[name] = m.weight.data
                    axis = 0 if w_granularity == "per_channel" else None
                    m.weight.data = linear.quantize(m.weight.data, w_bits, symmetric=True, axis=axis).dequantize()
                if a_bits is not None:
                    handles.append(m.register_forward_pre_hook(make_hook(name)))
        yield model
    finally:
        for h in handles:
            h.remove()
        for name, w in originals.items():
            layers[name].weight.data = w
