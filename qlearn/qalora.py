"""QA-LoRA (Xu et al., ICLR 2024): LoRA on a group-quantized base whose update merges into it losslessly.

The base is a b-bit asymmetric integer weight in groups of L input features (a `QTensor`, e.g.
`qlearn.quant.quantize(w, 4, symmetric=False, group_size=L)`), G = in / L groups per row:

    W_hat[o, gL + j] = scale[o, g] (q[o, gL + j] - z[o, g])            j = 0..L-1

QA-LoRA's adapter sees the input averaged over each quantization group:

    pool_L(x)[g] = (1/L) sum_j x[gL + j]                               (..., in) -> (..., G)
    h = W_hat x + b + s B A pool_L(x)          A (r x G), B (out x r), s = alpha / r

so A is L times smaller than LoRA's (r x in). Written as a weight, the update is s (B A)[o, g] / L at every
position of group g: constant within a group, like the zero point's share of W_hat. It therefore folds
into the zero points, and the codes and scales stay as they are:

    D  = s B A / L                      (out, G), the weight shift of each group
    z' = z - D / scale                  merge: scale (q - z') = scale (q - z) + D = W_hat + D, exactly

Precision: z' is no longer an integer. Kept in float32 (`merge()`), the merged weight equals W_hat + D up
to four float32 roundings (D / scale, z - ., q - z', times scale): |error| <= 2^-22 scale (|q| + |z'| +
|D| / scale) per weight, about 2^-20 scale for 4-bit codes (tested). Rounded to fp16 (zero_point_dtype=
torch.float16) the error grows to 2^-11 |z'| scale, in bf16 to 2^-8 |z'| scale; rounded to an integer in
the codes' range 0..2^b - 1 (GPTQ's packed format, zero_point_dtype=torch.int32) the update survives only
in whole grid steps: every |D| < scale / 2 is lost, as when LoRA is re-quantized (qlearn.merging).

PEFT's `use_qalora` (tuners/lora/variants.py, QALoraLinearVariant) runs on GPTQ layers only, multiplies
the pooled input by G as well (its A equals ours divided by G), and cannot merge (its merge raises
NotImplementedError). `apply_qalora` quantizes a model's linear layers with qlearn's RTN or GPTQ groups
and wraps them; `merge_qalora` replaces every QALoRALinear by a `QuantizedLinear` of its merged QTensor.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import modules
from .quant.linear import QTensor

__all__ = ["METHODS", "QALoRALinear", "QuantizedLinear", "apply_qalora", "merge_qalora", "qalora_layers"]

METHODS = ("rtn", "gptq")


def _check_qweight(qweight) -> None:
    """A 2-D asymmetric group-quantized QTensor in stored column order, else a clear error."""
    if not isinstance(qweight, QTensor):
        raise TypeError(f"qweight must be a qlearn.quant.QTensor (qlearn.quant.quantize(w, 4, "
                        f"symmetric=False, group_size=64)), got {type(qweight).__name__}")
    if len(qweight.shape) != 2 or qweight.group_size is None:
        raise ValueError(f"QA-LoRA needs a group-quantized (out, in) weight: its update folds into one "
                         f"zero point per group; got {qweight.granularity} of shape {tuple(qweight.shape)} "
                         f"(quantize with group_size=L)")
    if qweight.symmetric:
        raise ValueError("QA-LoRA folds its update into the zero points: qweight must be asymmetric "
                         "(symmetric=False), a symmetric grid has none")
    if qweight.perm is not None or qweight.input_scale is not None:
        raise ValueError("QA-LoRA pools consecutive input features: qweight must not carry an act-order "
                         "permutation (perm) or AWQ input scales (input_scale)")


def _check_adapter(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")


class QuantizedLinear(nn.Module):
    """h = W_hat x + b with W_hat = scale (q - z) from a group-quantized QTensor.

    The codes, scales and zero points are buffers (they move with `.to(device)`), bias a frozen parameter.
    W_hat is dequantized once and kept until a buffer changes (a simulation on plain PyTorch: a fused 4-bit
    kernel dequantizes tiles on the fly instead and never holds W_hat)."""

    def __init__(self, qweight: QTensor, bias: Tensor | None = None):
        super().__init__()
        _check_qweight(qweight)
        self.register_buffer("q", qweight.q)                    # (out, in) integer codes
        self.register_buffer("scale", qweight.scale)            # (out, G, 1)
        self.register_buffer("zero_point", qweight.zero_point)  # (out, G, 1)
        self._meta = {f.name: getattr(qweight, f.name) for f in dataclasses.fields(qweight)
                      if f.name not in ("q", "scale", "zero_point")}
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = qweight.shape
        self._cache = (None, None)  # (key, W_hat)

    @property
    def qweight(self) -> QTensor:
        """The QTensor these buffers hold (the same tensors, no copy)."""
        return QTensor(self.q, self.scale, self.zero_point, **self._meta)

    def dequantized(self) -> Tensor:
        """W_hat (out, in) in the quantized weight's dtype; recomputed when a buffer was changed or moved."""
        if torch.is_inference_mode_enabled():  # an inference tensor could not be saved for a later backward
            return self.qweight.dequantize()
        key = tuple((t.data_ptr(), t._version) for t in (self.q, self.scale, self.zero_point))
        if self._cache[0] != key:
            self._cache = (key, self.qweight.dequantize())
        return self._cache[1]

    def forward(self, x: Tensor) -> Tensor:
        w_hat = self.dequantized()
        return F.linear(x.to(w_hat.dtype), w_hat, None if self.bias is None else self.bias.to(w_hat.dtype))

    def extra_repr(self) -> str:
        return f"{self.qweight!r}, bias={self.bias is not None}"


class QALoRALinear(nn.Module):
    """W_hat x + b + s B A pool_L(x) on a frozen group-quantized weight (module docstring)."""

    def __init__(self, qweight: QTensor, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                 bias: Tensor | None = None):
        super().__init__()
        _check_adapter(r, alpha, dropout)
        self.base = QuantizedLinear(qweight, bias)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.group_size = qweight.group_size
        self.n_groups = self.in_features // self.group_size
        device = qweight.q.device
        # fp32 adapters on any base, as in qlearn.lora; A as nn.Linear's / PEFT's default, on G inputs
        self.A = nn.Parameter(torch.empty(r, self.n_groups, device=device))     # (r, G)
        self.B = nn.Parameter(torch.zeros(self.out_features, r, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def pool(self, x: Tensor) -> Tensor:
        """pool_L(x): the mean of each group of L consecutive input features, (..., in) -> (..., G)."""
        x = x.reshape(*x.shape[:-1], self.n_groups, self.group_size)  # (..., in) -> (..., G, L)
        return x.mean(dim=-1)  # (..., G)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base(x)
        pooled = self.pool(self.dropout(x.to(self.A.dtype)))          # (..., G)
        update = (pooled @ self.A.T @ self.B.T) * self.scaling          # (..., G) -> (..., r) -> (..., out)
        return (result + update).to(result.dtype)

    def group_shift(self) -> Tensor:
        """D = s B A / L (out, G): what the update adds to every weight of each group."""
        return (self.B @ self.A) * self.scaling / self.group_size

    def delta_weight(self) -> Tensor:
        """The update as an (out, in) weight: D repeated over the L positions of each group."""
        return self.group_shift().repeat_interleave(self.group_size, dim=1)

    @torch.no_grad()
    def merge(self, zero_point_dtype: torch.dtype = torch.float32) -> QTensor:
        """A NEW QTensor with the same codes and scales and zero points z' = z - D / scale (module docstring),
        rounded to `zero_point_dtype` (float32: exact to float rounding; float16/bfloat16; an integer dtype:
        to whole codes in 0..2^b - 1, GPTQ's packed format). Its `zero_point_bits` say what it stores."""
        dtype = zero_point_dtype
        integer = isinstance(dtype, torch.dtype) and not (dtype.is_floating_point or dtype.is_complex
                                                          or dtype == torch.bool)
        if not integer and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"zero_point_dtype must be torch.float32, float16, bfloat16 or an integer "
                             f"dtype, got {dtype!r}")
        qw = self.base.qweight
        shift = self.group_shift().unsqueeze(-1)  # (out, G, 1), the layout of scale and zero_point
        z = qw.zero_point - shift / qw.scale
        if not integer:
            z, bits = z.to(dtype).float(), torch.finfo(dtype).bits
        else:
            z, bits = torch.round(z).clamp(0, 2**qw.bits - 1), qw.bits  # GPTQ packs them in the codes' width
        if not torch.isfinite(z).all():
            raise ValueError("the merged zero points hold NaN or inf: A or B is broken")
        return dataclasses.replace(qw, q=qw.q.clone(), scale=qw.scale.clone(), zero_point=z,
                                   zero_point_bits=bits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, group_size={self.group_size}")


def qalora_layers(model: nn.Module) -> dict[str, QALoRALinear]:
    """The model's QALoRALinear layers by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear)}


@torch.no_grad()
def _hessians(model: nn.Module, layers: dict[str, nn.Linear], calib) -> dict[str, Tensor]:
    """GPTQ's H = 2 X^T X / N of every layer's inputs, recorded in one pass of the float model."""
    from .quant import gptq

    if not isinstance(calib, (list, tuple)) or not calib or not all(
            isinstance(t, Tensor) and not t.is_floating_point() and t.dim() in (1, 2) for t in calib):
        raise ValueError("calib must be a non-empty list of token-id tensors, (T,) or (B, T), "
                         "for method='gptq'")
    inputs = {name: [] for name in layers}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs[name].append(
        args[0].detach().reshape(-1, args[0].shape[-1]).float())) for name, m in layers.items()]
    device = next(model.parameters()).device
    try:
        for ids in calib:
            model(ids.reshape(1, -1).to(device) if ids.dim() == 1 else ids.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {name: gptq.hessian(torch.cat(xs)) for name, xs in inputs.items()}


def apply_qalora(model: nn.Module, r: int = 8, alpha: float = 16, bits: int = 4, group_size: int = 64,
                 method: str = "rtn", calib=None, target_modules=None, dropout: float = 0.0) -> nn.Module:
    """Freeze `model`, quantize every linear layer `target_modules` names (all but lm_head when None;
    qlearn.modules' rule) to `bits`-bit asymmetric groups of `group_size` with RTN or GPTQ, and wrap it in a
    QALoRALinear; in place, returns the model (modules.count_trainable: r (in / L + out) per layer).

    method="gptq" needs `calib`, a list of token-id tensors; each layer's Hessian comes from its inputs in
    one pass of the float model (quantize_model follows GPTQ's sequential recipe, for PTQ comparisons).
    """
    from .quant import gptq, quantize

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    _check_adapter(r, alpha, dropout)
    layers = modules.linear_layers(model, target_modules)
    if not layers:
        raise ValueError(f"no nn.Linear matches target_modules={target_modules!r}")
    for name, m in layers.items():
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
                or m.in_features % group_size:
            raise ValueError(f"group_size must be a positive int dividing in_features; {name} has "
                             f"in_features={m.in_features}, got group_size={group_size!r}")
    hessians = _hessians(model, layers, calib) if method == "gptq" else None
    model.requires_grad_(False)
    for name, m in layers.items():
        w = m.weight.detach()
        if method == "rtn":
            qweight = quantize(w, bits, symmetric=False, group_size=group_size)
        else:
            qweight = gptq.gptq_quantize(w, hessians.pop(name), bits, group_size, symmetric=False)
        modules.replace(model, name, QALoRALinear(qweight, r, alpha, dropout, bias=m.bias))
    return model


def merge_qalora(model: nn.Module, zero_point_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every QALoRALinear by a QuantizedLinear of its merged QTensor (same codes, new zero points);
    in place, returns the model."""
    layers = qalora_layers(model)
    if not layers:
        raise ValueError("the model holds no QALoRALinear layer: call apply_qalora first")
    for name, layer in layers.items():
        modules.replace(model, name, QuantizedLinear(layer.merge(zero_point_dtype), layer.base.bias))
    return model
