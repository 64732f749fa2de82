"""quantize_model: apply one post-training quantization method to every linear layer of a model.

Simulated quantization: each weight is replaced by its quantized-then-dequantized values (same dtype,
same module), so the model runs as before and its accuracy is exactly that of the quantized weights;
the memory saving is reported, not realized (packing and fast kernels are notebook 09's topic).

Left in high precision by default (`exclude=("lm_head",)`, matched by qlearn.modules' rule): `lm_head` (the output projection; quantizing it costs the most
perplexity per bit, and GPTQ, AWQ and bitsandbytes' LLM.int8 keep it too) and the embeddings (an
`nn.Embedding`, not an `nn.Linear`: a table lookup, left alone). Everything else that is an
`nn.Linear` is quantized: in a Llama, q/k/v/o_proj and gate/up/down_proj of every block.

Methods: "rtn", "gptq", "awq", "hqq" (integer grids of `bits` bits in groups of `group_size`) and "nf4",
"fp4" (bitsandbytes' 4-bit code books in blocks of `blocksize`, default 64). GPTQ and AWQ need calibration data:
`calib`, a list of token-id tensors. Their inputs are collected with forward hooks, sequentially as
GPTQ does it: the inputs of the next layers are recorded after all earlier layers are quantized, so
each layer sees (and can compensate) the errors of the ones before it. Layers fed the very same
input tensor (q, k, v; gate, up) are quantized from one pass and, for AWQ, share one scale vector.
The repeated blocks (a Llama's decoder layers) are replayed one at a time from their recorded inputs,
so calibration costs a few passes through the model, not one per layer.

Each layer's quantized state (a QuantState: `QTensor` for the integer methods, `nf4.Blockwise` for
nf4/fp4) is kept in the report, and the bits per parameter are the states' own `.bits_per_param()`
(qlearn.quant.state's one formula): integer methods bits + 32 / group (an fp16 scale and zero point per
group; symmetric 16 / group; AWQ's scales are folded into the previous operator and cost nothing);
nf4/fp4 4 + 32 / blocksize, or with double_quant 4 + 8 / blocksize + 32 / (256 blocksize).

Three ways to use it:
    quantize_model(model, ...)               in place; returns the model, with `model.quant_report`
    with quantized(model, ...) as report:    quantized inside the block, the original weights back after
    quantize_copy(model, ...)                a quantized deep copy (the model itself untouched)
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .. import modules
from . import awq, gptq, hqq, nf4, rtn
from .linear import QTensor
from .state import QuantState

__all__ = ["METHODS", "LayerReport", "QuantReport", "quantize_copy", "quantize_model", "quantized"]

METHODS = ("rtn", "gptq", "awq", "hqq", "nf4", "fp4")
CALIBRATED = ("gptq", "awq")


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    state: QuantState  # what is stored: codes, scales, zero points (its .dequantize() is the new weight)
    seconds: float

    @property
    def bits_per_param(self) -> float:
        return self.state.bits_per_param()

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class QuantReport:
    method: str
    bits: int
    group_size: int | None  # integer methods' group size, or nf4/fp4's blocksize
    layers: list[LayerReport] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # linear layers left in high precision (`exclude`)
    seconds: float = 0.0  # wall time, calibration passes included

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def bits_per_param(self) -> float:
        """Over the quantized layers: their storage bits over their parameters."""
        return sum(layer.state.storage_bits() for layer in self.layers) / self.params

    @property
    def states(self) -> dict[str, QuantState]:
        """Each quantized layer's state, by name."""
        return {layer.name: layer.state for layer in self.layers}

    def table(self) -> str:
        lines = [f"{'layer':40s} {'shape':>11s} {'bits/param':>10s} {'ms':>7s}"]
        lines += [f"{r.name:40s} {f'{r.shape[0]}x{r.shape[1]}':>11s} {r.bits_per_param:10.3f} "
                  f"{1000 * r.seconds:7.1f}" for r in self.layers]
        lines.append(f"{'total: ' + str(len(self.layers)) + ' layers':40s} {self.params:11d} "
                     f"{self.bits_per_param:10.3f} {1000 * self.seconds:7.1f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"QuantReport(method={self.method!r}, bits={self.bits}, group_size={self.group_size}, "
                f"layers={len(self.layers)}, params={self.params}, bits_per_param={self.bits_per_param:.3f}, "
                f"seconds={self.seconds:.2f}, kept={self.kept})")


def _split_rows(state: QTensor, sizes: list[int]) -> list[QTensor]:
    """The QTensor of weights stacked along their output rows, cut back into one state per weight
    (the rows' codes, scales and zero points; a column order and AWQ's input scales are shared)."""
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        shape = torch.Size((n, *state.shape[1:]))
        out.append(replace(state, q=state.q[rows], scale=state.scale[rows], zero_point=state.zero_point[rows],
                           shape=shape))
        start += n
    return out


def _check_calib(calib) -> list[Tensor]:
    if not isinstance(calib, (list, tuple)) or not calib or not all(
            isinstance(t, Tensor) and not t.is_floating_point() and t.dim() in (1, 2) and t.numel() > 0
            for t in calib):
        raise ValueError("calib must be a non-empty list of token-id tensors (1-D (T,) or 2-D (B, T), "
                         "integer dtype), e.g. qlearn.evaluate.token_windows(tokenizer)[:8].unbind()")
    by_length: dict[int, list[Tensor]] = {}  # one forward pass per sequence length, not per sequence
    for t in calib:
        t = t if t.dim() == 2 else t.unsqueeze(0)  # (B, T)
        by_length.setdefault(t.shape[1], []).append(t)
    return [torch.cat(batch) for batch in by_length.values()]


def _forward(model: nn.Module, ids: Tensor) -> None:
    # A transformers model must not build a KV cache here: replayed blocks would attend to it.
    config = getattr(model, "config", None)
    model(ids, use_cache=False) if getattr(config, "use_cache", None) is not None else model(ids)


class _StageDone(Exception):
    """Raised by a hook to stop a forward pass once what it needs is recorded."""


def _find_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's repeated blocks (a Llama's `model.layers`): the largest nn.ModuleList of modules
    that hold nn.Linear layers; None if there is none."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and all(any(isinstance(x, nn.Linear) for x in block.modules()) for block in m)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


@torch.no_grad()
def _block_inputs(model: nn.Module, block: nn.Module, calib: list[Tensor]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block receives for each calibration batch (the embeddings, the
    attention mask, the rotary position embeddings, ...), recorded by a hook that then stops the pass."""
    device = next(model.parameters()).device
    inputs = []

    def hook(module, args, kwargs):
        inputs.append((args, kwargs))
        raise _StageDone

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in calib:
            try:
                _forward(model, ids.to(device))
            except _StageDone:
                pass
    finally:
        handle.remove()
    return inputs


@torch.no_grad()
def _next_stage(run, pending: dict[str, nn.Linear]) -> tuple[list[str], Tensor | None]:
    """Call `run(i)` for each calibration batch i; return (names, X): the next layers to run and their
    shared input X (tokens, in_features). A stage is the first pending layer to run plus every pending
    layer fed the very same tensor; the first layer fed a different one ends the pass (nothing after
    it is computed)."""
    stage: list[str] = []
    inputs: list[Tensor] = []

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            if state["first"] is None:
                state["first"] = x
            elif x is not state["first"]:
                raise _StageDone
            if state["batch"] == 0:
                stage.append(name)
            elif name not in stage:
                raise _StageDone

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in pending.items()]
    try:
        batch = 0
        while True:
            state = {"first": None, "batch": batch}
            try:
                if not run(batch):
                    break
            except _StageDone:
                pass
            if state["first"] is not None:
                inputs.append(state["first"].reshape(-1, state["first"].shape[-1]).float())
            batch += 1
    finally:
        for h in handles:
            h.remove()
    return stage, (torch.cat(inputs) if inputs else None)


def _calibrated_stages(model: nn.Module, layers: dict[str, nn.Linear], calib: list[Tensor]):
    """Yield (stage, X) in execution order, each after the previous stages were quantized (by the
    caller, between two iterations): GPTQ's sequential recipe.

    Inside the repeated blocks the calibration batches are replayed block by block: the first block's
    inputs are recorded once, each block is re-run from its stored inputs up to the stage wanted, and
    its (quantized) output becomes the next block's input. That costs about three passes through the
    model instead of one per stage. Linear layers outside the blocks are then handled with whole-model
    passes."""
    device = next(model.parameters()).device
    blocks = _find_blocks(model)
    pending = dict(layers)
    if blocks is not None:
        inputs = _block_inputs(model, blocks[0], calib)
        for block in blocks:
            in_block = {n: m for n, m in pending.items() if any(m is x for x in block.modules())}

            def run_block(i, block=block, inputs=inputs):
                if i == len(inputs):
                    return False
                block(*inputs[i][0], **inputs[i][1])
                return True

            while in_block:
                stage, X = _next_stage(run_block, in_block)
                if not stage:
                    raise RuntimeError(f"layers {list(in_block)} were not called by their block's forward")
                yield stage, X
                for name in stage:
                    del in_block[name], pending[name]
            with torch.no_grad():  # the quantized block's outputs feed the next block
                outputs = [block(*args, **kwargs) for args, kwargs in inputs]
            inputs = [((out[0] if isinstance(out, tuple) else out, *args[1:]), kwargs)
                      for out, (args, kwargs) in zip(outputs, inputs)]

    def run_model(i):
        if i == len(calib):
            return False
        _forward(model, calib[i].to(device))
        return True

    while pending:
        stage, X = _next_stage(run_model, pending)
        if not stage:
            raise RuntimeError(f"layers {list(pending)} were not called by model(input_ids)")
        yield stage, X
        for name in stage:
            del pending[name]


def quantize_model(model: nn.Module, method: str, bits: int = 4, group_size: int | None = None,
                   calib: list[Tensor] | None = None, *, blocksize: int | None = None,
                   exclude: tuple[str, ...] = ("lm_head",), symmetric: bool = False, double_quant: bool = False,
                   act_order: bool = False, percdamp: float = 0.01, n_grid: int = 20) -> nn.Module:
    """Quantize every `nn.Linear` of `model` in place (simulated: weights replaced by their
    dequantized values) except those `exclude` names; return the model, whose `quant_report`
    (a QuantReport) holds every layer's state, bits per parameter and seconds.

    method      one of METHODS; bits in 2..8 (nf4/fp4: 4)
    group_size  rtn/gptq/awq/hqq: the group of input features sharing a scale (None: one per row)
    blocksize   nf4/fp4: the block sharing an absmax (default 64, bitsandbytes')
    calib       GPTQ/AWQ only: a list of token-id tensors, (T,) or (B, T)
    symmetric   integer methods except HQQ: symmetric grid (no zero point)
    double_quant  nf4/fp4: double-quantize the absmax values (QLoRA's DQ)
    act_order, percdamp  GPTQ's options; n_grid  AWQ's number of alpha values
    """
    # Step 1: validate everything before touching a weight.
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    codebook = method in ("nf4", "fp4")
    if codebook and bits != 4:
        raise ValueError(f"{method} is a 4-bit code book: bits must be 4, got {bits}")
    if codebook and group_size is not None:
        raise ValueError(f"{method} quantizes in blocks: pass blocksize= (bitsandbytes' name), not group_size")
    if not codebook and blocksize is not None:
        raise ValueError(f"{method} quantizes in groups: pass group_size= (GPTQ/AWQ/HQQ's name), not blocksize")
    if method == "hqq" and symmetric:
        raise ValueError("hqq optimizes a zero point: symmetric=True is not supported")
    if method in CALIBRATED:
        if calib is None:
            raise ValueError(f"{method} needs calibration data: pass calib=[token-id tensors] "
                             "(e.g. a few windows of the training text); rtn, hqq, nf4 and fp4 do not")
        calib = _check_calib(calib)
    elif calib is not None:
        raise ValueError(f"{method} uses no calibration data: calib is for {CALIBRATED}")
    group = (blocksize or 64) if codebook else group_size
    layers = modules.linear_layers(model, exclude=exclude)
    kept = [n for n in modules.linear_layers(model, exclude=()) if n not in layers]
    if not layers:
        raise ValueError(f"the model has no nn.Linear layer to quantize (excluded: {kept})")
    name_of = "blocksize" if codebook else "group_size"
    if group is not None:
        for name, m in layers.items():
            if isinstance(group, bool) or not isinstance(group, int) or group < 1 or m.in_features % group:
                raise ValueError(f"{name_of} must be {'' if codebook else 'None or '}a positive int dividing "
                                 f"in_features; {name} has in_features={m.in_features}, got {name_of}={group!r}")

    report = QuantReport(method, bits, group, kept=kept)
    start = time.perf_counter()

    def quantize_layer(name: str, state: QuantState, seconds: float) -> None:
        m = layers[name]
        m.weight.data.copy_(state.dequantize(m.weight.dtype))
        report.layers.append(LayerReport(name, tuple(m.weight.shape), state, seconds))

    # Step 2: calibration-free methods: one layer at a time from its weight alone.
    if method not in CALIBRATED:
        for name, m in layers.items():
            t = time.perf_counter()
            w = m.weight.data
            if method == "rtn":
                state = rtn.quantize_rtn(w, bits, group, symmetric=symmetric)
            elif method == "hqq":
                state = hqq.hqq_quantize(w, bits, group)
            else:
                quantize = nf4.quantize_nf4 if method == "nf4" else nf4.quantize_fp4
                state = quantize(w, blocksize=group, double_quant=double_quant)
            quantize_layer(name, state, time.perf_counter() - t)
    # Step 3: GPTQ / AWQ: stage by stage, inputs recorded after the earlier stages are quantized.
    else:
        t = time.perf_counter()
        for stage, X in _calibrated_stages(model, layers, calib):
            # The stage's weights, stacked along the output rows: they share X, hence GPTQ's Hessian
            # (whose rows are quantized independently: same result, one Cholesky) and AWQ's scales.
            weights = [layers[n].weight.data for n in stage]
            if method == "gptq":
                state = gptq.gptq_quantize(torch.cat(weights), gptq.hessian(X), bits, group,
                                           symmetric=symmetric, percdamp=percdamp, act_order=act_order)
            else:
                state, _, _ = awq.awq_quantize(torch.cat(weights), X, bits, group, n_grid=n_grid,
                                               symmetric=symmetric)
            seconds = (time.perf_counter() - t) / len(stage)  # this stage's share, calibration included
            for name, part in zip(stage, _split_rows(state, [w.shape[0] for w in weights])):
                quantize_layer(name, part, seconds)
            t = time.perf_counter()
    report.seconds = time.perf_counter() - start
    model.quant_report = report
    return model


@contextlib.contextmanager
def quantized(model: nn.Module, method: str, bits: int = 4, group_size: int | None = None,
              calib: list[Tensor] | None = None, **kwargs):
    """`with quantized(model, "gptq", 3, 64, calib=calib) as report: ...`: the model quantized inside the
    block (quantize_model's arguments), its original linear weights restored on leaving it, even after
    an error. Yields the QuantReport."""
    saved = {n: m.weight.detach().clone() for n, m in modules.linear_layers(model, exclude=()).items()}
    had_report = hasattr(model, "quant_report")
    try:
        yield quantize_model(model, method, bits, group_size, calib, **kwargs).quant_report
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                model.get_submodule(name).weight.copy_(weight)
        if not had_report and hasattr(model, "quant_report"):
            del model.quant_report


def quantize_copy(model: nn.Module, method: str, bits: int = 4, group_size: int | None = None,
                  calib: list[Tensor] | None = None, **kwargs) -> nn.Module:
    """A quantized deep copy of `model` (quantize_model's arguments); `model` itself is untouched."""
    return quantize_model(copy.deepcopy(model), method, bits, group_size, calib, **kwargs)
