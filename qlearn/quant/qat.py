"""Quantization-aware training (QAT): train through the rounding with fake quantization.

Fake quantization rounds to the grid and returns floats (quantize, then dequantize at once):

    q      = round(x / scale) + zero_point          (round half to even; x / scale as x * (1 / scale))
    x_hat  = (clamp(q, qmin, qmax) - zero_point) * scale

This is torch.fake_quantize_per_tensor_affine's rounding rule, which adds the zero point AFTER rounding
(qlearn.quant.linear's "zero_point_after"); torch.quantize_per_tensor (and `qlearn.quant.quantize`)
adds it before ("zero_point_first"). The two differ at exact ties with an odd zero point, so `convert`
builds its codes with the QAT rule: the converted layer computes exactly what the QAT forward did.

`round` is a staircase: its derivative is 0 almost everywhere, so the gradient of a loss through
it would be 0 and nothing would train. The straight-through estimator (STE; Bengio et al. 2013)
pretends the rounding was the identity in the backward pass, but keeps the clamp:

    d x_hat / d x = 1   if qmin <= q <= qmax    (the code needed no clamping)
                    0   otherwise

exactly as torch.fake_quantize_per_tensor_affine / fake_quantize_per_channel_affine compute it.

LSQ (learned step size quantization, Esser et al. 2020) also learns the scale s. With the STE,

    d x_hat / d s = round(x / s) - x / s    inside the range
                    qmin - zero_point       below it
                    qmax - zero_point       above it

and the summed gradient of each scale is multiplied by the gradient scale g = 1 / sqrt(N * Qp)
(N: the values sharing that scale, Qp = qmax), which keeps the step of s in proportion to s
(torch._fake_quantize_learnable_per_tensor_affine takes the same g as its `grad_factor`).

Modules:
    QATLinear     an nn.Linear whose weight (per output channel by default) and optionally input
                  are fake-quantized in the forward; optionally a learnable weight scale (LSQ)
    prepare_qat   replace the nn.Linear layers of a model by QATLinear (in place, sharing weights;
                  returns the model); layers chosen by qlearn.modules' rule, `exclude` as PEFT's
    convert       turn QATLinear layers back into nn.Linear holding the quantized weights (values
                  exactly on the grid, equal to the QAT forward's); returns the model, whose
                  `quant_report.states` holds each layer's QTensor

Scales and zero points come from qlearn.quant.linear (min-max, as torch's observers), the grid
from its `qrange`: symmetric codes in [-(2^(b-1)-1), 2^(b-1)-1], asymmetric in [0, 2^b-1].
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .. import modules
from .linear import QTensor, compute_scale_zero_point, qrange, quantize_codes

__all__ = ["FakeQuantize", "QATLinear", "convert", "fake_quantize", "lsq_grad_scale", "prepare_qat"]


class FakeQuantize(torch.autograd.Function):
    """x_hat = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale, with the STE
    gradient for x and the LSQ gradient (times grad_factor) for scale (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                grad_factor: float) -> Tensor:
        x_over_s = x.float() * (1.0 / scale)  # times the reciprocal, as torch's kernels do
        q = torch.round(x_over_s) + zero_point  # the code before clamping
        inside = (q >= qmin) & (q <= qmax)  # where the STE lets the gradient through
        q = q.clamp(qmin, qmax)
        ctx.save_for_backward(x_over_s, q, scale, zero_point, inside)
        ctx.grad_factor = grad_factor
        return ((q - zero_point) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x_over_s, q, scale, zero_point, inside = ctx.saved_tensors
        # STE: the rounding is treated as the identity, the clamp is not
        grad_x = grad_output * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # LSQ: round(x/s) - x/s inside; qmin - zp or qmax - zp where clamped
            d_scale = (q - zero_point) - torch.where(inside, x_over_s, 0.0)
            grad_scale = (grad_output.float() * d_scale).sum_to_size(scale.shape) * ctx.grad_factor
        return grad_x, grad_scale, None, None, None, None


def lsq_grad_scale(num_values: int, bits: int, symmetric: bool = True) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * Qp), N the values sharing one scale, Qp = qmax."""
    if isinstance(num_values, bool) or not isinstance(num_values, int) or num_values < 1:
        raise ValueError(f"num_values must be a positive int, got {num_values!r}")
    return 1.0 / math.sqrt(num_values * qrange(bits, symmetric)[1])


def _grouped_shape(shape: torch.Size, group_size: int | None) -> tuple[int, ...]:
    return tuple(shape) if group_size is None else (*shape[:-1], shape[-1] // group_size, group_size)


def fake_quantize(x: Tensor, bits: int, symmetric: bool = True, axis: int | None = None,
                  group_size: int | None = None, scale: Tensor | None = None,
                  zero_point: Tensor | None = None, grad_factor: float | None = None) -> Tensor:
    """Quantize-dequantize x in the forward, straight-through gradient in the backward.

    Without `scale`, the scale and zero point are computed from x by min-max (qlearn.quant.linear,
    per tensor, per channel along `axis` or per group of `group_size` along the last dimension) and
    treated as constants. With `scale` (and `zero_point`, default 0), they must broadcast against x
    (or, with group_size, against x viewed as (..., n // group_size, group_size)); a scale that
    requires grad gets the LSQ gradient times `grad_factor` (default lsq_grad_scale(N, bits)).
    """
    qmin, qmax = qrange(bits, symmetric)  # validates bits
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point was given without scale: give both, or neither to use min-max")
        scale, zero_point = compute_scale_zero_point(x.detach(), bits, symmetric, axis, group_size)
    else:
        scale, zero_point = _check_scale(x, scale, zero_point, bits, symmetric, axis, group_size, qmin, qmax)
    if grad_factor is None:
        grad_factor = lsq_grad_scale(max(1, x.numel() // scale.numel()), bits, symmetric)
    xg = x if group_size is None else x.reshape(_grouped_shape(x.shape, group_size))
    x_hat = FakeQuantize.apply(xg, scale, zero_point, qmin, qmax, grad_factor)
    return x_hat.reshape(x.shape)


def _check_scale(x, scale, zero_point, bits, symmetric, axis, group_size, qmin, qmax):
    if axis is not None or group_size is not None:
        if axis is not None and group_size is not None:
            raise ValueError("give either axis (per-channel) or group_size (per-group), not both")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1 or x.dim() == 0 or x.shape[-1] % group_size):
            raise ValueError(f"group_size must be a positive int dividing the last dimension, got {group_size!r}")
    if not isinstance(scale, Tensor) or not scale.is_floating_point():
        raise TypeError(f"scale must be a floating-point torch.Tensor, got {type(scale).__name__}")
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ValueError("scale must be finite and > 0 everywhere")
    if zero_point is None:
        zero_point = torch.zeros_like(scale.detach())
    if not isinstance(zero_point, Tensor):
        raise TypeError(f"zero_point must be a torch.Tensor or None, got {type(zero_point).__name__}")
    zero_point = zero_point.detach().float()
    if (zero_point != zero_point.round()).any() or (zero_point < qmin).any() or (zero_point > qmax).any():
        raise ValueError(f"zero_point must hold integers in [{qmin}, {qmax}] for bits={bits}, "
                         f"symmetric={symmetric}")
    if symmetric and (zero_point != 0).any():
        raise ValueError("zero_point must be 0 when symmetric=True")
    target = _grouped_shape(x.shape, group_size)
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        try:
            if torch.broadcast_shapes(t.shape, target) != torch.Size(target):
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast against x's "
                             f"{'grouped ' if group_size else ''}shape {target}") from None
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf: quantization needs finite values")
    return scale, zero_point


class QATLinear(nn.Linear):
    """y = fq_a(x) @ fq_w(W)^T + b: an nn.Linear with fake-quantized weights (and inputs if act_bits).

    Weights: `bits`, symmetric or not, one scale per output channel (axis=0, default), per tensor
    (axis=None) or per group of `group_size` input features (group_size overrides axis). The scale is recomputed by min-max at
    every forward, unless learn_scale=True: then `weight_scale` is an nn.Parameter (LSQ), started at
    the min-max scale of the weight (so QAT starts where post-training quantization ends), with the
    zero point fixed there. Activations (act_bits not None): symmetric min-max, recomputed on each
    batch, one scale per tensor, or per token with act_group_size=in_features.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 symmetric: bool = True, axis: int | None = 0, group_size: int | None = None,
                 act_bits: int | None = None, act_group_size: int | None = None, learn_scale: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        qrange(bits, symmetric)  # validates bits
        if act_bits is not None:
            qrange(act_bits, True)
        if axis not in (None, 0, -2):
            raise ValueError(f"axis must be 0 (per output channel) or None (per tensor), got {axis!r}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1 or in_features % group_size):
            raise ValueError(f"group_size must be a positive int dividing in_features ({in_features}), "
                             f"got {group_size!r}")
        if act_group_size is not None and (not isinstance(act_group_size, int) or act_group_size < 1
                                           or in_features % act_group_size):
            raise ValueError(f"act_group_size must be None or a positive int dividing in_features "
                             f"({in_features}), got {act_group_size!r}")
        self.bits, self.symmetric, self.group_size = bits, symmetric, group_size
        self.axis = None if group_size is not None or axis is None else 0
        self.act_bits, self.act_group_size, self.learn_scale = act_bits, act_group_size, learn_scale
        self.weight_scale: nn.Parameter | None = None
        self.register_buffer("weight_zero_point", None)
        if learn_scale and self.weight.device.type != "meta":
            self.init_scale()

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, **kwargs) -> QATLinear:
        """A QATLinear sharing `linear`'s weight and bias parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=bits,
                    device="meta", dtype=linear.weight.dtype, **kwargs)
        layer.weight, layer.bias = linear.weight, linear.bias
        if layer.learn_scale:
            layer.init_scale()
        return layer.train(linear.training)

    @torch.no_grad()
    def init_scale(self) -> None:
        """(Re)start the learnable scale at the min-max scale of the current weight."""
        scale, zero_point = compute_scale_zero_point(self.weight.detach(), self.bits, self.symmetric,
                                                     self.axis, self.group_size)
        self.weight_scale = nn.Parameter(scale)
        self.weight_zero_point = zero_point

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight the forward uses (differentiable)."""
        if self.learn_scale and self.weight_scale is None:
            raise RuntimeError("learn_scale=True but the scale is not initialised (the layer was built on the "
                               "meta device): call init_scale() once the weight holds values")
        scale = self.weight_scale if self.learn_scale else None
        zero_point = self.weight_zero_point if self.learn_scale else None
        return fake_quantize(self.weight, self.bits, self.symmetric, self.axis, self.group_size, scale, zero_point)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_bits is not None:
            x = fake_quantize(x, self.act_bits, True, group_size=self.act_group_size)
        return nn.functional.linear(x, self.quantized_weight(), self.bias)

    def to_qtensor(self) -> QTensor:
        """The weight as real integer codes on the grid the forward uses."""
        w = self.weight.detach()
        if self.learn_scale:
            scale, zero_point = self.weight_scale.detach(), self.weight_zero_point
        else:
            scale, zero_point = compute_scale_zero_point(w, self.bits, self.symmetric, self.axis, self.group_size)
        # the QAT forward's rounding rule, round(x / s) + z, so that the codes are exactly its grid points
        q = quantize_codes(w.reshape(_grouped_shape(w.shape, self.group_size)), scale, zero_point,
                           self.bits, self.symmetric, rounding="zero_point_after").reshape(w.shape)
        return QTensor(q, scale.clone(), zero_point.clone(), self.bits, self.symmetric, self.axis,
                       self.group_size, w.shape, w.dtype)

    def extra_repr(self) -> str:
        gran = (f"group_size={self.group_size}" if self.group_size else
                "per-tensor" if self.axis is None else "per-channel")
        act = f", act_bits={self.act_bits}" if self.act_bits is not None else ""
        lsq = ", learn_scale=True" if self.learn_scale else ""
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"{super().extra_repr()}, bits={self.bits}, {kind}, {gran}{act}{lsq}"


def prepare_qat(model: nn.Module, bits: int = 4, *, symmetric: bool = True, axis: int | None = 0,
                group_size: int | None = None, act_bits: int | None = None, act_group_size: int | None = None,
                learn_scale: bool = False, exclude: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a QATLinear sharing its parameters; return the
    model. Layers whose qualified name `exclude` matches (qlearn.modules' rule: the name or a name
    suffix; the output head by default, usually kept in higher precision) are left alone."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be a collection of names such as ('lm_head',), got the string {exclude!r}")
    exclude = tuple(exclude)
    if type(model) is nn.Linear:
        raise TypeError("model is a single nn.Linear, which cannot be replaced in place: "
                        "use QATLinear.from_linear(linear, bits)")
    # exact type: a QATLinear (an nn.Linear subclass) is not prepared again
    targets = modules.linear_layers(model, exclude=exclude, exact_type=True)
    if not targets:
        raise ValueError(f"model has no nn.Linear layer to prepare (exclude={exclude})")
    kwargs = {"symmetric": symmetric, "axis": axis, "group_size": group_size, "act_bits": act_bits,
              "act_group_size": act_group_size, "learn_scale": learn_scale}
    for name, linear in targets.items():
        modules.replace(model, name, QATLinear.from_linear(linear, bits, **kwargs))
    return model


def convert(model: nn.Module, *, drop_act_quant: bool = False) -> nn.Module:
    """Replace every QATLinear (in place) by an nn.Linear whose weight is the quantized weight
    (dequantized: values exactly on the grid, equal to the QAT forward's, exact ties included: the
    codes use its rounding rule); return the model. `model.quant_report.states` maps each converted
    layer's name to its QTensor.

    An nn.Linear cannot quantize its input, so layers trained with act_bits raise unless
    drop_act_quant=True (their outputs then differ from the QAT forward by the activation rounding).
    """
    from .model import LayerReport, QuantReport

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QATLinear)]
    if not layers:
        raise ValueError("model has no QATLinear layer: call prepare_qat(model, bits) first")
    acts = [name for name, m in layers if m.act_bits is not None]
    if acts and not drop_act_quant:
        raise ValueError(f"layers {acts[:3]}{'...' if len(acts) > 3 else ''} fake-quantize their inputs, "
                         "which an nn.Linear cannot: pass drop_act_quant=True to keep only the weights")
    first = layers[0][1]
    report = QuantReport("qat", first.bits, first.group_size)
    for name, layer in layers:
        qt = layer.to_qtensor()
        linear = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None,
                           device="meta", dtype=layer.weight.dtype)
        linear.weight = nn.Parameter(qt.dequantize(), requires_grad=layer.weight.requires_grad)
        linear.bias = layer.bias
        modules.replace(model, name, linear.train(layer.training))
        report.layers.append(LayerReport(name, tuple(qt.shape), qt, 0.0))
    model.quant_report = report
    return model
