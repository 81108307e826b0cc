"""Bit packing of the quantizer's codes and group maps (layout in weightops.quant.mixed).

Codes are packed little end first: code i of a 32-bit word sits at bits [b·i, b·(i+1)).

The codes arrive one per byte, and one multiplication gathers them. At 2 bits, four
bytes read as a little-endian int32 hold codes c0…c3 at bits 0, 8, 16 and 24; times
2²⁴ + 2¹⁸ + 2¹² + 2⁶, code ci lands at bit 24 + 2i, and every other product term at a bit
of its own below 24 or past 31 (the product wraps), so the top byte is the packed byte
c0 | c1<<2 | c2<<4 | c3<<6 with no carries. At 4 bits, two bytes read as an int16 hold c0
and c1 at bits 0 and 8; times 17, bits 4…11 hold c0 | c1<<4. A shift and a narrowing
conversion then leave the packed bytes, in memory order the packed words: three integer
operations per four or two codes, where shifting each code into place took a shift and
a sum per code.
"""

from __future__ import annotations

import math
import sys

import torch

LITTLE_ENDIAN = sys.byteorder == "little"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] codes < 2^bits (whole numbers of any dtype) -> int32 [rows, n·bits/32]."""
    rows = codes.shape[0]
    c = codes.to(torch.uint8).reshape(rows, -1).contiguous()
    if not LITTLE_ENDIAN:
        return _pack_by_sum(c, bits)
    # A narrowing conversion keeps the low bits, whatever the sign the product wrapped to.
    if bits == 2:
        x = c.view(torch.int32).mul(0x01041040).bitwise_right_shift_(24)
        return x.to(torch.uint8).view(torch.int32)
    if bits == 4:
        x = c.view(torch.int16).mul(17).bitwise_right_shift_(4)
        return x.to(torch.uint8).view(torch.int32)
    return _pack_by_sum(c, bits)


def _pack_by_sum(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    c = codes.to(torch.int64).reshape(codes.shape[0], -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    # The fields do not overlap, so their sum is their bitwise or; int64 -> int32 keeps
    # the low 32 bits, the two's complement the stored word needs.
    return (c << shifts).sum(-1).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return ((w[..., None] >> shifts) & (2**bits - 1)).reshape(words.shape[0], -1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    rows, n = mask.shape
    padded = torch.zeros(rows, math.ceil(n / 8) * 8, dtype=torch.int64)
    padded[:, :n] = mask.to(torch.int64)
    return (padded.reshape(rows, -1, 8) << torch.arange(8)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = (packed.to(torch.int64)[..., None] >> torch.arange(8)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :n].bool()
