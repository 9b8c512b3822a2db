"""Dense bit packing of integer codes into bytes, for any width 1..8 bits.

Layout (little-endian bit order, documented because checkpoints depend on it): the codes are
flattened row-major into one bit stream, code i occupying stream bits [i*b, (i+1)*b) with its
least significant bit first, and stream bit j is bit (j % 8) of byte j // 8. So 8 int3 codes
fill exactly 3 bytes, codes straddle byte boundaries, and the last byte is zero-padded:

    pack([1, 2, 3, 4, 5, 6, 7, 0], 3) -> bytes 0xD1 0x58 0x1F   (= 0x1F58D1 = sum c_i << 3i)

Widths 1, 2, 4 and 8 give the usual nibble / crumb layouts (code 0 in the low bits of byte 0).
Signed codes are stored as `bits`-bit two's complement (the low `bits` bits of the code); unpack
with `signed=True` sign-extends them back.

Ternary codes {-1, 0, +1} can also be packed base 3, five trits per byte (3^5 = 243 <= 256):
1.6 bits per weight instead of 2. Byte = sum((t_i + 1) * 3**i) over trits i = 0..4 of a chunk.
"""
from __future__ import annotations

import math

import torch

TRITS_PER_BYTE = 5


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes taken by `numel` codes of `bits` bits: ceil(numel * bits / 8)."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def packed_nbytes_trits(numel: int) -> int:
    return -(-numel // TRITS_PER_BYTE)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _code_range(bits: int, signed: bool | None) -> tuple[int, int]:
    if signed is None:  # accept either reading; unpack must be told which one was meant
        return -(1 << (bits - 1)), (1 << bits) - 1
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def pack(codes: torch.Tensor, bits: int, signed: bool | None = None) -> torch.Tensor:
    """Pack integer codes (any shape, flattened row-major) into a 1-D uint8 tensor.

    `signed` only tightens the range check: True allows [-2^(b-1), 2^(b-1)-1], False [0, 2^b-1],
    None the union of both."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"pack needs integer codes, got {codes.dtype}")
    flat = codes.reshape(-1)
    lo, hi = _code_range(bits, signed)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        kind = {True: "signed ", False: "unsigned ", None: ""}[signed]
        raise ValueError(f"codes span [{int(flat.min())}, {int(flat.max())}], outside the "
                         f"[{lo}, {hi}] of {bits}-bit {kind}codes")
    # Two's complement: keep the low `bits` bits (int16 first so int8 -> uint8 masking is exact).
    u = (flat.to(torch.int16) & ((1 << bits) - 1)).to(torch.uint8)
    n = u.numel()
    if 8 % bits == 0:
        # Whole codes per byte: shift each into its slot and OR (the slots are disjoint, so sum).
        per = 8 // bits
        u = torch.nn.functional.pad(u, (0, -n % per))
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return (u.view(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)
    # Odd widths straddle bytes: spell out the bit stream, then regroup it by eights.
    stream = ((u.unsqueeze(1) >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    return (stream.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape: int | tuple[int, ...] | torch.Size,
           signed: bool = False) -> torch.Tensor:
    """Inverse of `pack`: int8 codes when `signed`, else uint8, reshaped to `shape` (or a count)."""
    _check_bits(bits)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    need = packed_nbytes(numel, bits)
    if packed.dtype != torch.uint8 or packed.numel() < need:
        raise ValueError(f"unpack needs at least {need} uint8 bytes for {numel} {bits}-bit codes, "
                         f"got {packed.numel()} of {packed.dtype}")
    p = packed.reshape(-1)[:need]
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        u = ((p.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    else:
        stream = ((p.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
        stream = stream[:numel * bits].view(numel, bits)
        u = (stream << torch.arange(bits, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)
    if not signed:
        return u.reshape(shape)
    s = u.to(torch.int16)
    s = s - ((s >> (bits - 1)) & 1) * (1 << bits)   # sign-extend the top code bit
    return s.to(torch.int8).reshape(shape)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes {-1, 0, +1} (any shape, row-major), five per byte in base 3."""
    flat = codes.reshape(-1)
    if codes.dtype.is_floating_point or (flat.numel() and (int(flat.min()) < -1 or int(flat.max()) > 1)):
        raise ValueError("pack_trits needs integer codes in {-1, 0, +1}")
    d = (flat.to(torch.int16) + 1)
    d = torch.nn.functional.pad(d, (0, -d.numel() % TRITS_PER_BYTE), value=1)  # pad with trit 0
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)
    return (d.view(-1, TRITS_PER_BYTE) * powers).sum(dim=1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, shape: int | tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_trits`: int8 codes in {-1, 0, +1} of `shape` (or a count)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    need = packed_nbytes_trits(numel)
    if packed.dtype != torch.uint8 or packed.numel() < need:
        raise ValueError(f"unpack_trits needs at least {need} uint8 bytes for {numel} trits, "
                         f"got {packed.numel()} of {packed.dtype}")
    p = packed.reshape(-1)[:need].to(torch.int16).unsqueeze(1)
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)
    digits = (p // powers) % 3
    return (digits.reshape(-1)[:numel] - 1).to(torch.int8).reshape(shape)
