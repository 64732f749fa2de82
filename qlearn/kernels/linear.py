"""NF4Linear: a bitsandbytes Linear4bit whose forward runs qlearn's Triton kernels.

    y = x W^T + b      with W = NF4 (bitsandbytes' packed bytes and QuantState, shared, not copied)

    rows of x <= gemv_rows (decoding), no gradient needed:  y = gemv_4bit(x, W)        (W never formed)
    otherwise (prefill, training):                          y = x dequantize_4bit(W)^T (one dequantize,
                                                                then a tensor-core matmul)

As in Linear4bit, x is cast to `compute_dtype` (when set) and y back to x's dtype. The weight stays
frozen: gradients flow to x (the dequantize path) as in QLoRA, never to W.
`use_nf4_kernels(model)` swaps every NF4 Linear4bit of a model in place and returns the model;
`to_linear4bit(model)` makes such a model from a 16-bit one without a checkpoint on disk (QLoRA's
storage: NF4, blocks of 64, double quantization), as `from_pretrained(quantization_config=...)` would.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..modules import linear_layers, replace
from ._state import nf4_weight
from .gemv import gemv_4bit
from .nf4 import dequantize_4bit

__all__ = ["GEMV_ROWS", "NF4Linear", "to_linear4bit", "use_nf4_kernels"]

GEMV_ROWS = 1  # rows of x the fused GEMV takes; beyond, dequantize + matmul (H200: at 2 rows the GEMV took 93 us vs 59, benchmarks/gpu/batch_roofline.json)


class NF4Linear(nn.Module):
    """y = x W^T + b with W held as bitsandbytes' NF4 `weight` (a Params4bit, or packed bytes with a
    `quant_state`); see the module docstring for which kernel runs when."""

    def __init__(self, weight: Tensor, quant_state=None, bias: Tensor | None = None, *,
                 compute_dtype: torch.dtype | None = None, gemv_rows: int = GEMV_ROWS):
        super().__init__()
        quant_state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        w = nf4_weight(weight, quant_state)  # checks everything once, with clear errors
        if len(w.shape) != 2 or w.shape[1] % w.blocksize:
            raise ValueError(f"the weight must be 2-D (out_features, in_features) with in_features a multiple "
                             f"of blocksize ({w.blocksize}), got shape {tuple(w.shape)}")
        if isinstance(gemv_rows, bool) or not isinstance(gemv_rows, int) or gemv_rows < 0:
            raise ValueError(f"gemv_rows must be an int >= 0 (0: never use the GEMV), got {gemv_rows!r}")
        self.out_features, self.in_features = w.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.quant_state = quant_state
        self.bias = bias
        self.compute_dtype = compute_dtype
        self.gemv_rows = gemv_rows

    @classmethod
    def from_linear4bit(cls, layer: nn.Module, *, gemv_rows: int = GEMV_ROWS) -> NF4Linear:
        """The same weight, bias and compute dtype as a (quantized) bitsandbytes Linear4bit."""
        if getattr(layer.weight, "quant_state", None) is None:
            raise ValueError("the Linear4bit is not quantized yet: bitsandbytes quantizes when the layer "
                             "moves to its device (layer.cuda()); convert after that")
        return cls(layer.weight, layer.weight.quant_state, layer.bias,
                   compute_dtype=getattr(layer, "compute_dtype", None), gemv_rows=gemv_rows)

    def forward(self, x: Tensor) -> Tensor:
        input_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        rows = x.numel() // self.in_features
        if rows <= self.gemv_rows and not (torch.is_grad_enabled() and x.requires_grad):
            y = gemv_4bit(x, self.weight, self.quant_state)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:  # the bias inside F.linear, as bitsandbytes' own dequantize + linear path adds it
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = torch.nn.functional.linear(x, dequantize_4bit(self.weight, self.quant_state, dtype=x.dtype), bias)
        return y.to(input_dtype)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={s.blocksize}, double_quant={s.nested}, gemv_rows={self.gemv_rows}")


def use_nf4_kernels(model: nn.Module, *, gemv_rows: int = GEMV_ROWS) -> nn.Module:
    """Swap every NF4 bitsandbytes Linear4bit of `model` for an NF4Linear sharing its weight (in
    place); return the model. FP4 layers are left as they are."""
    from bitsandbytes.nn import Linear4bit

    for name, layer in linear_layers(model, kind=Linear4bit, exclude=()).items():
        if getattr(layer.weight, "quant_state", None) is not None and layer.weight.quant_state.quant_type == "nf4":
            replace(model, name, NF4Linear.from_linear4bit(layer, gemv_rows=gemv_rows))
    return model


def to_linear4bit(model: nn.Module, *, compute_dtype: torch.dtype = torch.bfloat16, compress_statistics: bool = True,
                  blocksize: int = 64, exclude=("lm_head",)) -> nn.Module:
    """Replace the nn.Linear layers of `model` (not those `exclude` names) by bitsandbytes NF4 Linear4bit
    layers on each layer's device (in place: bitsandbytes quantizes there); return the model."""
    import bitsandbytes as bnb

    for name, lin in linear_layers(model, exclude=exclude, exact_type=True).items():
        device = lin.weight.device
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta",
                                  compute_dtype=compute_dtype, compress_statistics=compress_statistics,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=compress_statistics,
                                         quant_type="nf4", blocksize=blocksize, module=layer).to(device)
        if lin.bias is not None:
            layer.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        replace(model, name, layer)
    return model
