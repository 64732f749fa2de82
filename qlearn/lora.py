"""LoRA from scratch (Hu et al. 2021), and the family PEFT's flags name: rsLoRA, DoRA, PiSSA, LoftQ.

For a frozen weight W (out x in) and an input x (..., in):

    h = W x + b + s B A dropout(x)
    s = alpha / r                 (use_rslora=True: s = alpha / sqrt(r), rsLoRA, Kalajdzievski 2023)

    init="default"  A (r x in) Kaiming-uniform (a = sqrt(5), PEFT's init_lora_weights=True), B (out x r)
                    zeros, so the wrapped layer starts out exactly equal to the base layer

Only A and B train: r (in + out) parameters instead of in x out. rsLoRA keeps the update's size from
shrinking as r grows (with alpha / r it falls like 1 / sqrt(r) for a fixed learning rate), so a rank sweep
compares ranks, not step sizes. Merging folds the update into the weight:

    merge:    W' = W + s B @ A
    unmerge:  W  = W' - s B @ A      (equal to W up to the rounding of the two additions)

DoRA (Liu et al. 2024, use_dora=True) splits the weight into a magnitude m per output feature and a direction:

    W' = m (W + s B A) / ||W + s B A||       ||.|| the L2 norm of each row (out,), m initialised to ||W||
    h  = W' x + b

computed as PEFT does: the norm n = ||W + s B A|| is a constant for the gradient (detached, DoRA Sec. 4.3),
and with x_d = dropout(x),  h = base(x) + (m / n - 1) W x_d + (m / n) s B A x_d  (= W' x + b without dropout).

PiSSA (Meng et al. 2024, init="pissa"): the adapter starts as the top-r singular triplets of W = U S V^T,
the base keeps the rest, so h is unchanged at step 0:

    B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) V_r^T       (s B A = U_r S_r V_r^T)
    W_res = W - s B A                                      (base.weight, PEFT's base_layer.weight)

"pissa_niter_k": U_r, S_r, V_r from torch.svd_lowrank with k subspace iterations (randomized, faster).
Quantizing W_res instead of W is QPiSSA: the largest directions stay in the float adapter.

LoftQ (Li et al. 2023, init="loftq"): a quantized base Q and an adapter that together approximate W:

    s B A = 0;  repeat loftq_iter times:   Q = quant(W - s B A);   s B A = SVD_r(W - Q)
    error = ||W - (Q + s B A)||_F          base.weight = Q (dequantized, as PEFT keeps it)

quant is NF4 in blocks of 64 for loftq_bits=4 (PEFT's LoftQ quantizer: bitsandbytes' NF4, matched bit for
bit by qlearn.quant.nf4), and RTN asymmetric integer groups of 64 for 2, 3, 5..8 bits. One iteration
already beats QLoRA's init (Q = quant(W), B = 0): the adapter starts as the best rank-r fit of the error.

qlearn's names are PEFT's (`peft.tuners.lora.layer.Linear`): `A` is `lora_A[name].weight`, `B` is
`lora_B[name].weight`, `magnitude` is `lora_magnitude_vector[name].weight`, `r`, `alpha` is `lora_alpha`,
`scaling`, `base` is `base_layer`, `init` is `init_lora_weights`, loftq_bits/loftq_iter are LoftQConfig's;
same A, B (and magnitude) give the same output (tests/test_lora*.py).

The base may also be a bitsandbytes `Linear4bit` (QLoRA) or `Linear8bitLt`: their forward dequantizes on the
fly, so the same wrapper trains them. Merging in place into a quantized base would re-quantize the merged
weight and can erase a small update (peft#2321), so `merge()` returns a dequantized 16/32-bit nn.Linear
instead (the safe path, notebook 08) and `merge_()` refuses; QA-LoRA (qlearn.qalora) merges losslessly.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from . import modules

__all__ = ["INITS", "LoRALinear", "apply_lora", "dequantized_weight", "is_quantized", "loftq_init",
           "lora_layers", "merge_lora", "pissa_init"]

INITS = ("default", "pissa", "pissa_niter_<k>", "loftq")  # PEFT's init_lora_weights names qlearn implements
_PEFT_ONLY = ("gaussian", "eva", "olora", "corda", "orthogonal", "mica", "lora_ga")  # PEFT's, not qlearn's
_LOFTQ_GROUP = 64  # NF4 blocksize and RTN group size of LoftQ's quantizer


def is_quantized(layer: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear layer (whose weight is not a float tensor)."""
    return not layer.weight.is_floating_point() or hasattr(layer.weight, "quant_state")


@torch.no_grad()
def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight (out x in) as a float tensor, dequantizing a bitsandbytes weight."""
    weight = base.weight
    if getattr(weight, "quant_state", None) is not None:  # Params4bit: NF4/FP4 codes + blockwise absmax
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state)  # (out, in) in the quant_state's dtype
    if getattr(weight, "SCB", None) is not None:  # Int8Params (LLM.int8): int8 codes, one absmax per row
        return weight.data.float() * (weight.SCB.float() / 127).unsqueeze(1)  # (out, in) * (out, 1)
    if not weight.is_floating_point():
        raise ValueError(f"cannot dequantize a {type(base).__name__} weight of dtype {weight.dtype}")
    return weight.data


def _check_args(r, alpha, dropout, use_rslora, use_dora, init, loftq_bits, loftq_iter,
                alpha_name="alpha") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or alpha <= 0:
        raise ValueError(f"{alpha_name} must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    for name, flag in (("use_rslora", use_rslora), ("use_dora", use_dora)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    named = isinstance(init, str) and (init in ("default", "pissa", "loftq")
                                       or re.fullmatch(r"pissa_niter_\d+", init) is not None)
    if not named:
        known = f"; PEFT's {init!r} is not implemented in qlearn (use PEFT)" if init in _PEFT_ONLY else ""
        raise ValueError(f"init must be one of {INITS} (PEFT's init_lora_weights names), got {init!r}{known}")
    if isinstance(loftq_bits, bool) or not isinstance(loftq_bits, int) or not 2 <= loftq_bits <= 8:
        raise ValueError(f"loftq_bits must be an int in 2..8 (4: NF4, else RTN integer groups), "
                         f"got {loftq_bits!r}")
    if isinstance(loftq_iter, bool) or not isinstance(loftq_iter, int) or loftq_iter < 1:
        raise ValueError(f"loftq_iter must be a positive int, got {loftq_iter!r}")


@torch.no_grad()
def pissa_init(w: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """(A, B, W_res) of PiSSA (module docstring): s B A = U_r S_r V_r^T and W_res = W - s B A, in float32.

    niter=None: the exact SVD (init="pissa"); niter=k: torch.svd_lowrank, k iterations ("pissa_niter_k")."""
    _check_args(r, scaling, 0.0, False, False, "pissa", 4, 1, "scaling")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be None or an int >= 0, got {niter!r}")
    if r > min(w.shape):
        raise ValueError(f"PiSSA needs r <= min(out, in) = {min(w.shape)}, got r={r}")
    w = w.float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(w, r, niter=niter)  # U (out, r), S (r,), V (in, r)
        Vh = V.t()
    S = S / scaling
    A = torch.diag(torch.sqrt(S)) @ Vh  # (r, in)
    B = U @ torch.diag(torch.sqrt(S))   # (out, r)
    return A, B, w - scaling * B @ A


def _loftq_quantizer(bits: int):
    """W -> dequantize(quantize(W)), float32: NF4 blocks of 64 for 4 bits, else RTN asymmetric groups of 64"""
    from .quant import nf4, quantize

    if bits == 4:
        return lambda w: nf4.quantize_nf4(w, blocksize=_LOFTQ_GROUP).dequantize(torch.float32)
    return lambda w: quantize(w, bits, symmetric=False, group_size=_LOFTQ_GROUP).dequantize(torch.float32)


@torch.no_grad()
def loftq_init(w: torch.Tensor, r: int, scaling: float = 1.0, bits: int = 4, iters: int = 1):
    """(Q, A, B, errors) of LoftQ (module docstring), float32: `iters` alternations of Q = quant(W - s B A)
    and s B A = SVD_r(W - Q); errors[t] = ||W - (Q + s B A)||_F after iteration t + 1."""
    _check_args(r, scaling, 0.0, False, False, "loftq", 4, 1, "scaling")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8 (4: NF4, else RTN integer groups), got {bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if r > min(w.shape):
        raise ValueError(f"LoftQ needs r <= min(out, in) = {min(w.shape)}, got r={r}")
    if bits != 4 and w.shape[1] % _LOFTQ_GROUP:
        raise ValueError(f"LoftQ's {bits}-bit RTN groups of {_LOFTQ_GROUP} need in_features divisible by "
                         f"{_LOFTQ_GROUP}, got {w.shape[1]}")
    quant = _loftq_quantizer(bits)
    w = w.float()
    low_rank = torch.zeros_like(w)  # s B A: zero at first, so iteration 1 quantizes W itself (QLoRA's Q)
    errors = []
    for _ in range(iters):
        # Step 1: quantize what the adapter does not carry.
        q = quant(w - low_rank)
        # Step 2: the adapter takes the best rank-r approximation of the quantization error (Eckart-Young).
        U, S, Vh = torch.linalg.svd(w - q, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        root = torch.sqrt(S[:r] / scaling)
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]  # (out, r), (r, in)
        low_rank = scaling * B @ A
        errors.append((w - (q + low_rank)).norm().item())
    return q, A, B, errors


class LoRALinear(nn.Module):
    """`base(x) + s B A dropout(x)` around a frozen nn.Linear (or bitsandbytes layer); DoRA if use_dora."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, init: str = "default", *,
                 loftq_bits: int = 4, loftq_iter: int = 1):
        super().__init__()
        if not isinstance(base, nn.Linear):  # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear
            raise TypeError(f"base must be an nn.Linear (or a bitsandbytes Linear4bit/Linear8bitLt), "
                            f"got {type(base).__name__}")
        _check_args(r, alpha, dropout, use_rslora, use_dora, init, loftq_bits, loftq_iter)
        if init != "default" and is_quantized(base):
            raise ValueError(f"init={init!r} needs the full-precision weight: initialise on a float base, "
                             "then quantize the residual (PEFT asks the same)")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.use_rslora, self.use_dora, self.init = r, alpha, use_rslora, use_dora, init
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # fp32 adapters even on a 16-bit or 4-bit base, as PEFT does (autocast_adapter_dtype=True):
        # AdamW's small updates to A and B would be rounded away in bf16's 8-bit mantissa.
        device = base.weight.device
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=device))   # (r, in)
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init != "default":
            with torch.no_grad():
                w = base.weight
                if init == "loftq":
                    q, A, B, _ = loftq_init(w, r, self.scaling, loftq_bits, loftq_iter)
                else:
                    niter = None if init == "pissa" else int(init.split("_")[-1])
                    A, B, q = pissa_init(w, r, self.scaling, niter)
                self.A.copy_(A)
                self.B.copy_(B)
                w.copy_(q.to(w.dtype))  # the base becomes the residual (PiSSA) or the quantized Q (LoftQ)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.magnitude = None
        if use_dora:  # m = ||W + s B A|| per output feature: the layer starts where the base (+ adapter) is
            with torch.no_grad():
                norm = self.weight_norm(dequantized_weight(base).float(), self.delta_weight().float())
            self.magnitude = nn.Parameter(norm)  # (out,)
        self.merged = False
        self._merge_norm = None  # DoRA: n at merge time, needed to unmerge

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """s B @ A, the (out x in) update LoRA adds to W (PEFT's get_delta_weight)."""
        return (self.B @ self.A) * self.scaling

    @staticmethod
    def weight_norm(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """DoRA's n = ||W + s B A||, the L2 norm of each row (out,), in W's dtype."""
        return torch.linalg.norm(w + delta, dim=1).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:  # the update already sits in base.weight
            return result
        x = x.to(self.A.dtype)
        x_d = self.dropout(x)
        lora = x_d @ self.A.T @ self.B.T  # (..., in) -> (..., r) -> (..., out), PEFT's order
        if not self.use_dora:
            return (result + lora * self.scaling).to(result.dtype)
        # DoRA (module docstring), PEFT's expression: n detached, base(x) reused when dropout is off
        w = dequantized_weight(self.base).to(x.dtype)
        norm = self.weight_norm(w, self.scaling * (self.B @ self.A).detach()).detach()  # (out,)
        scale = self.magnitude / norm
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_out = result if self.base.bias is None else result - self.base.bias
        else:
            base_out = F.linear(x_d, w)
        return (result + ((scale - 1) * base_out + scale * lora * self.scaling)).to(result.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W' in float32 (W dequantized first for a quantized base): W + s B A, or DoRA's m (W + s B A) / n"""
        w = dequantized_weight(self.base).float()
        if self.merged:
            return w
        delta = self.delta_weight().float()
        merged = w + delta
        if self.use_dora:
            scale = self.magnitude.float() / self.weight_norm(w, delta)
            merged = scale.view(-1, 1) * merged  # (out, 1) * (out, in)
        if not torch.isfinite(merged).all():
            raise ValueError("the merged weight holds NaN or inf: A, B or the magnitude is broken")
        return merged

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A NEW plain nn.Linear holding W' (`merged_weight`); this wrapper is left unchanged.

        The new layer has the base weight's dtype; for a quantized base, the layer's compute dtype
        (bf16 in QLoRA) or bf16: merging into the dequantized weight is the safe path.
        """
        merged = self.merged_weight()
        dtype = self.base.weight.dtype
        if is_quantized(self.base):
            dtype = getattr(self.base, "compute_dtype", None) or torch.bfloat16
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=merged.device, dtype=dtype)
        out.weight.copy_(merged.to(dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias.to(dtype))
        return out.requires_grad_(False)

    @torch.no_grad()
    def merge_(self) -> LoRALinear:
        """Merge in place, W <- W' (one rounding to the weight's dtype), keeping A and B for `unmerge_()`."""
        if is_quantized(self.base):
            raise ValueError("cannot merge in place into a quantized base: re-quantizing W + scaling*B@A "
                             "rounds small updates away (peft#2321). Use merge(), which returns a "
                             "dequantized nn.Linear, or merge into a bf16/fp32 copy of the base")
        if self.merged:
            raise RuntimeError("already merged: call unmerge_() first")
        weight = self.base.weight
        if self.use_dora:
            self._merge_norm = self.weight_norm(weight.float(), self.delta_weight().float())
        weight.copy_(self.merged_weight().to(weight.dtype))
        self.merged = True
        return self

    @torch.no_grad()
    def unmerge_(self) -> LoRALinear:
        """Undo `merge_()`: W <- W' - s B A, or W' n / m - s B A for DoRA (the old W up to rounding)."""
        if not self.merged:
            raise RuntimeError("not merged: call merge_() first")
        weight, w = self.base.weight, self.base.weight.float()
        if self.use_dora:
            w = w / (self.magnitude.float() / self._merge_norm).view(-1, 1)
        weight.copy_((w - self.delta_weight().float()).to(weight.dtype))
        self.merged, self._merge_norm = False, None
        return self

    unmerge = unmerge_  # the name the issue uses

    def extra_repr(self) -> str:
        flags = "".join(f", {k}=True" for k in ("use_rslora", "use_dora") if getattr(self, k))
        init = "" if self.init == "default" else f", init={self.init!r}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}{flags}{init}, merged={self.merged}")


def apply_lora(model: nn.Module, target_modules, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               use_rslora: bool = False, use_dora: bool = False, init: str = "default", *,
               loftq_bits: int = 4, loftq_iter: int = 1) -> nn.Module:
    """Freeze `model` and wrap every nn.Linear that `target_modules` names (qlearn.modules.matches, PEFT's
    rule) in a LoRALinear with the given flags; in place, returns the model (modules.count_trainable counts).

    Layers are wrapped in `named_modules` order, as PEFT does; lm_head is wrapped only when named.
    """
    targets = modules.normalize_names(target_modules)
    if not targets:
        raise ValueError(f"target_modules must be a non-empty list of module names such as "
                         f"['q_proj', 'v_proj'], got {target_modules!r}")
    _check_args(r, alpha, dropout, use_rslora, use_dora, init, loftq_bits, loftq_iter)
    chosen = {name: m for name, m in modules.linear_layers(model, targets, exclude=()).items()
              if not isinstance(model.get_submodule(name.rpartition(".")[0]), LoRALinear)}  # not a .base
    if not chosen:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matches target_modules={list(targets)}; the model's linear layers "
                         f"are named {linears}")
    model.requires_grad_(False)
    for name, layer in chosen.items():
        modules.replace(model, name, LoRALinear(layer, r, alpha, dropout, use_rslora, use_dora, init,
                                                loftq_bits=loftq_bits, loftq_iter=loftq_iter))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear layers by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear (`LoRALinear.merge`); in place, returns the model."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model holds no LoRALinear layer: call apply_lora first")
    for name, layer in layers.items():
        modules.replace(model, name, layer.merge())
    return model
