"""The notebook 09 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted."""

import math

import torch

from qlearn.check import nb09


def bits_per_weight(code_bits, block_size, metadata_bits):
    return code_bits + metadata_bits / block_size


def bits_per_weight_no_metadata(code_bits, block_size, metadata_bits):  # the usual mistake
    return float(code_bits)


def q4_0_block(x):
    m = x[x.abs().argmax()]
    d = m / -8
    inv = 1 / d if d != 0 else torch.tensor(0.0)
    codes = torch.trunc(x * inv + 8.5).clamp(0, 15).to(torch.uint8)
    return d, codes


def q4_0_block_absmax(x):  # the usual mistake: the magnitude without its sign
    d = x.abs().max() / -8
    return d, torch.trunc(x / d + 8.5).clamp(0, 15)


def q4_0_block_no_clip(x):
    m = x[x.abs().argmax()]
    d = m / -8
    return d, torch.trunc(x / d + 8.5)


def weight_bytes(shape, bits_per_weight):
    return shape.linear_params * bits_per_weight / 8 + (shape.params - shape.linear_params) * 2


def weight_bytes_everything_quantized(shape, bits_per_weight):
    return shape.params * bits_per_weight / 8


def adamw_state_bytes(n_params, state_bits, blocksize=256):
    if state_bits == 8:
        return 2 * (n_params + 4 * math.ceil(n_params / blocksize))
    return 2 * n_params * state_bits // 8


def adamw_one_state(n_params, state_bits, blocksize=256):
    return n_params * state_bits // 8


def test_bits_per_weight_checker(check_exercise):
    check_exercise(nb09.bits_per_weight, bits_per_weight, bits_per_weight_no_metadata, "metadata_bits / block_size")


def test_q4_0_block_checker(check_exercise):
    check_exercise(nb09.q4_0_block, q4_0_block, q4_0_block_absmax, "WITH its sign")
    result = nb09.q4_0_block(q4_0_block_no_clip)
    assert result.status == "FAILED" and "clip to 0..15" in result.message


def test_weight_bytes_checker(check_exercise):
    check_exercise(nb09.weight_bytes, weight_bytes, weight_bytes_everything_quantized, "stay 16-bit")


def test_adamw_state_bytes_checker(check_exercise):
    check_exercise(nb09.adamw_state_bytes, adamw_state_bytes, adamw_one_state, "two states")


def test_q4_0_reference_cases_cover_both_signs_of_the_scale():
    signs = {math.copysign(1, nb09._gguf_q4_0(x)[0]) for x in nb09._q4_0_cases()}
    assert signs == {1.0, -1.0}
    cases = nb09._q4_0_cases()
    clipped = [bool((torch.trunc(x / (x[x.abs().argmax()] / -8) + 8.5) > 15).any()) for x in cases]
    assert any(clipped)  # a case where clipping to 15 matters
