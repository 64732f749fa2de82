"""Checkers for notebook 00 (start here: why memory matters).

0.1 largest_model(fn):  fn(memory_gb, bits) -> the parameters whose weights fill memory_gb:
                        memory_gb x 1e9 / (bits / 8)
0.2 training_gb(fn):    fn(n_params, param_bytes=2, master_bytes=4, states=2, state_bytes=4) -> GB of
                        weights + gradients + master copy + optimizer states:
                        n_params x (param_bytes + param_bytes + master_bytes + states x state_bytes) / 1e9
                        (defaults: mixed-precision AdamW, 2 + 2 + 4 + 2 x 4 = 16 bytes per parameter)

GB is 10^9 bytes throughout the course, as in model cards and papers (a GiB is 2^30 = 1.074 GB).
"""

from __future__ import annotations

from . import CheckResult, exercise

__all__ = ["largest_model", "training_gb"]

GB = 1e9
GIB_RATIO = 2**30 / GB


def _number(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _same(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-9 * abs(b)


def _unit_hint(got, expected: float) -> str | None:
    """A hint for a unit slip (bits for bytes, GiB for GB, bytes for GB), or None."""
    got = _number(got)
    if not got or not expected:
        return None
    for ratio, hint in ((8, "8 times too large: bytes = bits / 8"), (1 / 8, "8 times too small: bytes = bits / 8"),
                        (1 / GIB_RATIO, "GB here is 10^9 bytes (1e9), not a GiB (2**30)"),
                        (GIB_RATIO, "GB here is 10^9 bytes (1e9), not a GiB (2**30)"),
                        (1e9, "give the answer in GB: divide the bytes by 1e9")):
        if _same(got / expected, ratio):
            return hint
    return None


def largest_model(fn) -> CheckResult:
    """Exercise 0.1: parameters = memory_gb * 1e9 / (bits / 8)."""
    cases = [(16, 16, 8e9), (16, 4, 32e9), (80, 16, 40e9), (24, 4.5, 24e9 * 8 / 4.5)]
    with exercise("0.1", "the largest model that fits") as ex:
        for memory_gb, bits, expected in cases:
            got = fn(memory_gb, bits)
            hint = _unit_hint(got, expected) or "parameters = bytes / (bytes per parameter) = memory_gb x 1e9 / (bits / 8)"
            if _same(_number(got), memory_gb * GB * bits / 8):
                hint = "you multiplied by the bytes per parameter; divide by it: memory_gb x 1e9 / (bits / 8)"
            elif _same(_number(got), memory_gb / (bits / 8)):
                hint = "that is in billions of parameters: multiply memory_gb by 1e9 to get bytes first"
            ex.close(got, expected, what=f"largest_model({memory_gb}, {bits})", atol=0.0, rtol=1e-9,  # float rounding
                     hint=hint)
    return ex.result


def training_gb(fn) -> CheckResult:
    """Exercise 0.2: n_params * (2 * param_bytes + master_bytes + states * state_bytes) / 1e9."""
    cases = [  # (n_params, keyword arguments, the recipe)
        (7e9, {}, "mixed-precision AdamW (the defaults)"),
        (7e9, {"param_bytes": 2, "master_bytes": 0, "states": 2, "state_bytes": 2}, "pure bf16 AdamW"),
        (1e9, {"param_bytes": 4, "master_bytes": 0, "states": 1, "state_bytes": 4}, "fp32 SGD with momentum"),
        (7e9, {"param_bytes": 2, "master_bytes": 4, "states": 2, "state_bytes": 1}, "8-bit AdamW, mixed precision"),
        (13e9, {"param_bytes": 4, "master_bytes": 0, "states": 2, "state_bytes": 4}, "fp32 AdamW"),
    ]
    with exercise("0.2", "training memory") as ex:
        for n, kw, recipe in cases:
            p, m, s, sb = (kw.get("param_bytes", 2), kw.get("master_bytes", 4), kw.get("states", 2),
                           kw.get("state_bytes", 4))
            expected = n * (2 * p + m + s * sb) / GB
            got = fn(n, **kw)
            g = _number(got)
            slips = [  # (what the slip gives, its hint); several can give the same number
                (n * (p + m + s * sb) / GB,
                 "count the gradients: one per trained parameter, in the parameters' dtype (param_bytes)"),
                (n * (2 * p + m + sb) / GB if s != 1 else None,
                 "each of the `states` optimizer states takes state_bytes per parameter: states x state_bytes"),
                (n * (2 * p + s * sb) / GB if m else None,
                 "add the master copy of the weights (master_bytes per parameter; 0 when there is none)"),
            ]
            hints = [h for value, h in slips if value is not None and _same(g, value)]
            hint = " -- or -- ".join(hints) or _unit_hint(got, expected) or (
                "bytes per parameter = param_bytes (weights) + param_bytes (gradients) + master_bytes "
                "+ states x state_bytes")
            args = ", ".join([f"{n:g}"] + [f"{k}={v}" for k, v in kw.items()])
            ex.close(got, expected, what=f"training_gb({args}) for {recipe}", atol=0.0, rtol=1e-9,  # float rounding
                     hint=hint)
    return ex.result
