"""Bit packing of the quantizer's codes and group maps (layout in weightops.quant.mixed).

Codes are packed little end first: code i of a 32-bit word sits at bits [b·i, b·(i+1)).
"""

from __future__ import annotations

import math

import torch


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] codes < 2^bits -> int32 [rows, n·bits/32]."""
    per = 32 // bits
    rows = codes.shape[0]
    c = codes.to(torch.int32).reshape(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    # The fields do not overlap, so their sum is their bitwise or; int32 wraps the top
    # code of the last field into bit 31, the two's complement the stored word needs.
    return (c << shifts).sum(-1, dtype=torch.int32)


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
