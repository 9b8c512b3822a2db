"""Bit packing: exact round trips for every width, sizes, and the documented bit layout."""
import math

import pytest
import torch

from leanlm.formats.pack import pack, pack_trits, packed_nbytes, packed_nbytes_trits, unpack, unpack_trits


def ref_pack(codes, bits):
    """The layout, spelled out in Python integers: code i at bits [i*b, (i+1)*b) of one big
    little-endian integer."""
    v = sum((c & ((1 << bits) - 1)) << (i * bits) for i, c in enumerate(codes))
    return list(v.to_bytes(math.ceil(len(codes) * bits / 8), "little"))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("n", [1, 7, 13, 1001])
def test_round_trip_every_width(bits, signed, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    codes = torch.randint(lo, hi + 1, (n,), generator=g)
    p = pack(codes, bits, signed)
    assert p.dtype == torch.uint8 and p.shape == (packed_nbytes(n, bits),)
    assert p.numel() == math.ceil(n * bits / 8)
    out = unpack(p, bits, n, signed)
    assert out.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(out.long(), codes)
    assert p.tolist() == ref_pack(codes.tolist(), bits)


def test_hand_checked_int3_layout():
    # 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 | 0<<21 = 0x1F58D1, little-endian bytes.
    p = pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3)
    assert p.tolist() == [0xD1, 0x58, 0x1F]
    assert unpack(p, 3, 8).tolist() == [1, 2, 3, 4, 5, 6, 7, 0]


def test_small_layouts_and_twos_complement():
    assert pack(torch.tensor([1, 2, 15]), 4).tolist() == [0x21, 0x0F]     # low nibble first
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack(torch.tensor([-1, 1]), 3).tolist() == [0b00001111]          # -1 -> 0b111
    assert unpack(torch.tensor([0b00001111], dtype=torch.uint8), 3, 2, signed=True).tolist() == [-1, 1]
    assert pack(torch.tensor([-128, 127], dtype=torch.int8), 8).tolist() == [0x80, 0x7F]


def test_shapes_and_dtypes_round_trip():
    codes = torch.randint(-4, 4, (6, 10), dtype=torch.int8)
    assert torch.equal(unpack(pack(codes, 3), 3, codes.shape, signed=True), codes)
    big = torch.randint(0, 32, (300_000,), dtype=torch.uint8)            # vectorised: instant
    assert torch.equal(unpack(pack(big, 5), 5, big.numel()), big)
    assert pack(torch.zeros(0, dtype=torch.int8), 3).numel() == 0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="0"):
        pack(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="9"):
        pack(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match=r"\[0, 8\]"):
        pack(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match=r"\[-4, 3\]"):
        pack(torch.tensor([3, 4]), 3, signed=True)
    with pytest.raises(ValueError, match="integer"):
        pack(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="3 uint8 bytes"):
        unpack(torch.zeros(2, dtype=torch.uint8), 3, 8)


def test_trits_round_trip_and_layout():
    for n in (1, 5, 7, 1003):
        t = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int8)
        p = pack_trits(t)
        assert p.numel() == packed_nbytes_trits(n) == math.ceil(n / 5)
        assert torch.equal(unpack_trits(p, n), t)
    # digits (t + 1) = 2, 1, 0, 2, 2 -> 2 + 1*3 + 0*9 + 2*27 + 2*81 = 221
    assert pack_trits(torch.tensor([1, 0, -1, 1, 1])).tolist() == [221]
    with pytest.raises(ValueError, match="-1, 0"):
        pack_trits(torch.tensor([2]))
