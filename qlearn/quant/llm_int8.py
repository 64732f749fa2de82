"""LLM.int8() (Dettmers et al., 2022): vector-wise int8 matrix multiplication plus a mixed-precision
decomposition for the few input features that carry outliers.

For Y = X W^T + b with X (tokens, in) and W (out, in), rounded to float16 first (X16, W16) as the
paper's float16 models and bitsandbytes do:

    O    = { j : |X16_tj| >= threshold for some token t of the batch }      the outlier features
    c_t  = max_{j : |X16_tj| < threshold} |X16_tj|                            row (token) absmax of X
    r_i  = max_j |W16_ij|                                                     row absmax of W
    CX_tj = round(127 X16_tj / c_t)   (0 for j in O),    CW_ij = round(127 W16_ij / r_i)

    Y = (CX CW^T) * c_t r_i / 127^2  +  b  +  X[:, O] (CW[:, O] r_i / 127)^T

The first term is an int8 x int8 -> int32 product with one scale per row of X and one per row of W
(vector-wise quantization); the last term carries the outlier features in X's own precision. The
paper keeps W in float16 for that term (`outlier_weight="float"`: X[:, O] W[:, O]^T); bitsandbytes'
`Linear8bitLt(has_fp16_weights=False)`, what transformers' load_in_8bit builds, stores only the int8
weight, so it multiplies the outlier features with the dequantized int8 columns, and so does this
module by default (`outlier_weight="int8"`, bitsandbytes 0.50's CPU path, `backends/default/ops.py`).
The difference shows when the outliers are huge: their products with int8-rounded weights carry the
weights' rounding error times a huge x. Two more details
of that path followed here: the threshold test is `>=`, and c_t leaves out only the outlier entries of
row t (the other entries of an outlier column still count), while the codes of whole outlier
columns are zeroed.

threshold=None is vector-wise int8 without the decomposition (bitsandbytes' threshold=0.0).
Storage: 8 bits per weight plus a float32 absmax per output row (8 + 32 / in_features).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import modules
from .state import QuantState, storage_bits

__all__ = ["Int8Linear", "Int8Weight", "convert", "linear", "outlier_features", "quantize_rows",
           "quantize_weight", "to_bitsandbytes"]


_INV_127_SQUARED = 1 / 127**2  # bitsandbytes 0.50's CPU path multiplies by 6.200124e-05 instead (1.8e-5 larger)


def _check_threshold(threshold) -> None:
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number (LLM.int8 uses 6.0) or None for no "
                         f"decomposition, got {threshold!r}")


@dataclass(repr=False)
class Int8Weight(QuantState):
    """A weight in vector-wise int8: codes (out, in) int8 and absmax (out,) float32, W ~ codes * absmax / 127."""

    codes: Tensor
    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype

    bits = 8

    def _values(self) -> Tensor:
        return self.codes.float() * (self.absmax[:, None] / 127)

    @property
    def granularity(self) -> str:
        return "per-row (vector-wise)"

    def storage_bits(self) -> float:
        return storage_bits(self.codes.numel(), 8, scales=self.absmax.numel(), scale_bits=32)


def quantize_rows(x: Tensor, threshold: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(codes int8, absmax float32, outlier feature indices) of a 2-D x by rows, as in the module docstring:
    x rounded to float16, entries with |x| >= threshold left out of their row's absmax, outlier columns zeroed."""
    _check_threshold(threshold)
    x16 = x.detach().to(torch.float16)
    big = x16.abs() >= threshold if threshold is not None else torch.zeros_like(x16, dtype=torch.bool)
    outliers = torch.nonzero(big.any(dim=0)).flatten()
    kept = x16.masked_fill(big, 0)
    absmax = kept.abs().amax(dim=1).float()  # (rows,)
    codes = torch.round(kept.float() * (127.0 / absmax[:, None]))  # float16 * float32 -> float32, as bitsandbytes
    codes = torch.where(absmax[:, None] > 0, codes, 0).to(torch.int8)  # an all-outlier (or zero) row: codes 0
    codes[:, outliers] = 0
    return codes, absmax, outliers


def quantize_weight(weight: Tensor) -> Int8Weight:
    """W (out, in) -> Int8Weight: CW_ij = round(127 W16_ij / r_i), r_i = max_j |W16_ij| (no threshold)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor (out_features, in_features), got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    codes, absmax, _ = quantize_rows(weight)
    return Int8Weight(codes, absmax, weight.shape, weight.dtype)


def outlier_features(x: Tensor, threshold: float = 6.0) -> Tensor:
    """The input features j with |x_tj| >= threshold in some row t (LLM.int8's set O), sorted."""
    _check_threshold(threshold)
    return torch.nonzero((x.detach().reshape(-1, x.shape[-1]).to(torch.float16).abs() >= threshold).any(dim=0)).flatten()


OUTLIER_WEIGHTS = ("int8", "float")


def linear(x: Tensor, weight: Tensor | Int8Weight, threshold: float | None = 6.0, bias: Tensor | None = None,
           *, outlier_weight: str = "int8") -> Tensor:
    """LLM.int8's Y = X W^T + b (module docstring) for x (..., in); returns x's dtype and shape (..., out).

    outlier_weight  "int8": the outlier features meet the dequantized int8 weight (bitsandbytes'
                    has_fp16_weights=False); "float": they meet `weight` itself (the paper; needs a float weight)
    """
    _check_threshold(threshold)
    if outlier_weight not in OUTLIER_WEIGHTS:
        raise ValueError(f"outlier_weight must be one of {OUTLIER_WEIGHTS}, got {outlier_weight!r}")
    if outlier_weight == "float" and isinstance(weight, Int8Weight):
        raise ValueError("outlier_weight='float' needs the float weight, not an Int8Weight (its float values are gone)")
    w = weight if isinstance(weight, Int8Weight) else quantize_weight(weight)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x must be a float tensor (..., {w.shape[1]}) for a weight of shape {tuple(w.shape)}, "
                         f"got {getattr(x, 'shape', type(x).__name__)}")
    X = x.reshape(-1, x.shape[-1])  # (tokens, in)
    # Step 1: the rows of X in int8, the outlier features left out.
    CX, c, O = quantize_rows(X, threshold)
    # Step 2: the int8 product, exact in int32 (done as a float32 matmul of integers: |sum| < 2^24 for in <= 1040).
    acc = CX.float() @ w.codes.float().T if X.shape[1] <= 1040 else (CX.long() @ w.codes.long().T).float()
    # Step 3: dequantize with the row scales of X and W.
    Y = acc * (c[:, None] * w.absmax[None, :]) * _INV_127_SQUARED
    if bias is not None:
        Y = Y + bias.float()
    Y = Y.to(x.dtype)
    # Step 4: the outlier features in X's precision, times the dequantized weight columns.
    if O.numel():
        W_O = weight[:, O] if outlier_weight == "float" else w.codes[:, O].float() * (w.absmax[:, None] / 127)
        Y = Y + X[:, O] @ W_O.to(x.dtype).T
    return Y.reshape(*x.shape[:-1], w.shape[0])  # (..., out)


class Int8Linear(nn.Module):
    """A linear layer stored in vector-wise int8 that runs `linear` (LLM.int8) in its forward."""

    def __init__(self, layer: nn.Linear, threshold: float | None = 6.0, outlier_weight: str = "int8"):
        super().__init__()
        _check_threshold(threshold)
        if outlier_weight not in OUTLIER_WEIGHTS:
            raise ValueError(f"outlier_weight must be one of {OUTLIER_WEIGHTS}, got {outlier_weight!r}")
        self.in_features, self.out_features, self.threshold = layer.in_features, layer.out_features, threshold
        self.outlier_weight = outlier_weight
        w = quantize_weight(layer.weight.detach())
        self.register_buffer("codes", w.codes)
        self.register_buffer("absmax", w.absmax)
        # the paper's variant keeps the float weight for the outlier features (no memory saving in this simulation)
        self.register_buffer("float_weight", layer.weight.detach().clone() if outlier_weight == "float" else None)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self._dtype = layer.weight.dtype

    @property
    def weight_state(self) -> Int8Weight:
        return Int8Weight(self.codes, self.absmax, torch.Size((self.out_features, self.in_features)), self._dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.outlier_weight == "float":
            return linear(x, self.float_weight, self.threshold, self.bias, outlier_weight="float")
        return linear(x, self.weight_state, self.threshold, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}, "
                f"outlier_weight={self.outlier_weight!r}")


def convert(model: nn.Module, threshold: float | None = 6.0, *, outlier_weight: str = "int8", targets=None,
            exclude=("lm_head",)) -> nn.Module:
    """Replace every selected nn.Linear of `model` by an Int8Linear, in place; return the model.
    (lm_head stays in full precision, as transformers' load_in_8bit keeps it.) Copy the model first to keep it."""
    _check_threshold(threshold)
    for name, layer in modules.linear_layers(model, targets, exclude).items():
        modules.replace(model, name, Int8Linear(layer, threshold, outlier_weight))
    return model


class _DropCastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


def to_bitsandbytes(model: nn.Module, threshold: float | None = 6.0, *, targets=None,
                    exclude=("lm_head",)) -> nn.Module:
    """Replace every selected nn.Linear by bitsandbytes' Linear8bitLt(threshold, has_fp16_weights=False),
    in place, and return the model in eval mode (in training mode bitsandbytes' CPU path multiplies the
    dequantized weight in float instead: `MatMul8bitFp`). Used to check `linear` against the library."""
    import bitsandbytes as bnb

    _check_threshold(threshold)
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastWarning) for f in log.filters):
        log.addFilter(_DropCastWarning())  # float32 inputs are cast to float16 for quantization: on purpose here
    for name, layer in modules.linear_layers(model, targets, exclude).items():
        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  has_fp16_weights=False, threshold=threshold or 0.0)
        new.weight = bnb.nn.Int8Params(layer.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        new = new.to(layer.weight.device if layer.weight.device.type != "meta" else "cpu")  # quantizes here
        modules.replace(model, name, new)
    return model.eval()
