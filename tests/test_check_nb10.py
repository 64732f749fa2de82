"""The notebook 10 checkers: a correct answer passes, a typical mistake fails with its hint, a stub is
reported as not attempted."""

from qlearn.check import nb10


def logits_bytes(batch, seq, vocab):
    return batch * seq * vocab * 4


def logits_bytes_bf16(batch, seq, vocab):  # the usual mistake: 2 bytes per value
    return batch * seq * vocab * 2


def intensity(batch, n_out, k_in, weight_bits):
    return 2 * batch * n_out * k_in / (n_out * k_in * weight_bits / 8 + 2 * batch * (k_in + n_out))


def intensity_weights_only(batch, n_out, k_in, weight_bits):  # forgets x and y
    return 2 * batch * n_out * k_in / (n_out * k_in * weight_bits / 8)


def intensity_bits_as_bytes(batch, n_out, k_in, weight_bits):
    return 2 * batch * n_out * k_in / (n_out * k_in * weight_bits + 2 * batch * (k_in + n_out))


def intensity_no_factor_two(batch, n_out, k_in, weight_bits):
    return batch * n_out * k_in / (n_out * k_in * weight_bits / 8 + 2 * batch * (k_in + n_out))


def test_logits_bytes_checker(check_exercise):
    check_exercise(nb10.logits_bytes, logits_bytes, logits_bytes_bf16, "4 bytes")


def test_arithmetic_intensity_checker(check_exercise):
    check_exercise(nb10.arithmetic_intensity, intensity, intensity_weights_only, "count the activations too")
    assert "half a byte" in nb10.arithmetic_intensity(intensity_bits_as_bytes).message
    assert "2 floating-point operations" in nb10.arithmetic_intensity(intensity_no_factor_two).message
    assert "return a number" in nb10.arithmetic_intensity(lambda *a: None).message
