"""Memory: storage bits per parameter, Llama shapes, the training-memory ledger, and measuring peaks.

    qlearn.memory.bits     bits_per_param(fmt): storage cost per weight, scales included (floats, NF4/FP4,
                           integer groups, LLM.int8, block-scaled MX/NVFP4/FP8 recipes, GGUF k- and i-quants)
    qlearn.memory.shapes   Shape, LLAMA_SHAPES, shape_of(model_or_config)
    qlearn.memory.ledger   estimate(model_or_config, method, ...) -> Ledger: the bytes of a training step
    qlearn.memory.measure  peak_memory(fn): the bytes torch allocates while fn runs (CPU or CUDA)

The names below are re-exported here (`qlearn.memory.estimate`, `qlearn.memory.bits_per_param`).
"""

from .bits import BLOCK_FORMATS, FLOAT_BITS, GGUF_LAYOUTS, bits_per_param
from .ledger import ATTENTION, LORA_TARGETS, METHODS, OPTIMIZERS, Ledger, estimate
from .measure import peak_memory
from .shapes import LLAMA_SHAPES, Shape, shape_of

__all__ = ["ATTENTION", "BLOCK_FORMATS", "FLOAT_BITS", "GGUF_LAYOUTS", "LLAMA_SHAPES", "LORA_TARGETS", "METHODS", "OPTIMIZERS", "Ledger", "Shape",
           "bits_per_param", "estimate", "peak_memory", "shape_of"]
