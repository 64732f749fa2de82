"""qlearn.quant.packing: exact round trips, the byte layout, bitsandbytes' nibble order, errors."""

import bitsandbytes.functional as F
import pytest
import torch

from qlearn.quant import nf4, pack, unpack
from qlearn.quant.packing import packed_nbytes


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 63, 1000])
def test_round_trip_is_exact(bits, numel):
    torch.manual_seed(numel)
    q = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits)
    assert torch.equal(unpack(packed, bits, numel), q)


def test_layout_first_code_in_the_high_bits():
    assert pack(torch.tensor([0x1, 0xA]), 4).tolist() == [0x1A]
    assert pack(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b11000110]
    assert pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [0b00101001, 0b11001011, 0b10111000]


def test_4bit_layout_is_bitsandbytes():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    packed, _ = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    codes = nf4.quantize_nf4(w, blocksize=64).codes
    assert torch.equal(pack(codes, 4), packed.reshape(-1))  # the first code in the high nibble
    assert torch.equal(unpack(packed.reshape(-1), 4, w.numel()), codes.reshape(-1))


def test_4bit_order_is_visible_in_one_bitsandbytes_byte():
    # NF4's table[15] = 1.0 and table[7] = 0.0: a block (1.0, 0.0, 0, ...) gives codes 15, 7, 7, ...
    w = torch.zeros(64)
    w[0] = 1.0
    packed, _ = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert packed.reshape(-1)[0].item() == 0xF7 == pack(torch.tensor([15, 7]), 4).item()


def test_packing_saves_what_it_promises():
    q = torch.randint(0, 4, (1024,), dtype=torch.uint8)
    assert pack(q, 2).numel() == 256 and pack(q, 4).numel() == 512 and pack(q, 3).numel() == 384


def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.tensor([1]), 5)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 15\]"):
        pack(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="codes must be in"):
        pack(torch.tensor([-1]), 4)
    with pytest.raises(TypeError, match="integer torch.Tensor"):
        pack(torch.tensor([1.0]), 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.tensor([1]), 4, 2)
    with pytest.raises(ValueError, match="numel must be"):
        unpack(torch.tensor([1], dtype=torch.uint8), 4, 3)
