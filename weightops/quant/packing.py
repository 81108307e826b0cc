"""Bit packing of the quantizer's codes and group maps (layout in weightops.quant.mixed).

Codes are packed little end first: code i of a 32-bit word sits at bits [b·i, b·(i+1)).

The codes arrive one per byte. Four bytes read as one little-endian int32 hold four codes
at bits 0, 8, 16 and 24; two shift-or-mask steps slide them together (to bits 0, b, 2b,
3b), which leaves 8 bits of 2-bit codes or 16 bits of 4-bit codes per four codes, and
those, read back in memory order, are the packed words: a handful of integer operations on
a quarter of the codes instead of a shift and a sum per code.
"""

from __future__ import annotations

import math
import sys

import torch

_LITTLE_ENDIAN = sys.byteorder == "little"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] codes < 2^bits (whole numbers of any dtype) -> int32 [rows, n·bits/32]."""
    rows = codes.shape[0]
    c = codes.to(torch.uint8).reshape(rows, -1).contiguous()
    if not _LITTLE_ENDIAN:
        return _pack_by_sum(c, bits)
    x = c.view(torch.int32)  # four codes, one per byte
    if bits == 2:
        x = (x | (x >> 6)).bitwise_and_(0x000F000F)
        x = (x | (x >> 12)).bitwise_and_(0xFF)
        return x.to(torch.uint8).view(torch.int32)
    if bits == 4:
        x = (x | (x >> 4)).bitwise_and_(0x00FF00FF)
        x = (x | (x >> 8)).bitwise_and_(0xFFFF)
        # int32 -> int16 keeps the low 16 bits: the bit pattern, whatever its sign.
        return x.to(torch.int16).view(torch.int32)
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
