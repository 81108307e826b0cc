"""Mixed 2/4-bit group quantization of one weight matrix, and its packed form.

The scheme follows Li et al. ("Enabling Fast 2-bit LLM on GPUs: Memory Alignment and
Asynchronous Dequantization"): weights are quantized in groups of `group_size`
consecutive inputs of one output row; most groups get 2 bits, the groups where 4 bits
remove the most error get 4 bits.

Per group (asymmetric): w ≈ lo + q·s with q ∈ [0, 2ᵇ − 1]. The range is clipped by the
factor (from a small grid) that minimises the group's squared error, weighted by a
per-input importance h (the diagonal of the calibration Hessian, mean x²) when given.

Scales are quantized too ("2-order"): s and lo are stored as 8-bit integers against one
fp16 super-scale per row each (s = s_q·S, lo = lo_q·L), and the codes are chosen for
the quantized s and lo, so what is stored dequantizes exactly to what was optimised.

Memory alignment: every row gets the same number k4 of 4-bit groups, a multiple of 4
when the row has a multiple of 4 groups and at least 16 of them. With group_size 64 a 2-bit group is 16 bytes
and a 4-bit group 32 bytes, so each row is a run of 2-bit groups and a run of 4-bit
groups that are both whole 64-byte cache lines: rows have equal length, start aligned,
and a kernel gives every thread the same work. (The paper leaves the granularity open;
this is the smallest one that keeps both runs line-aligned.)

Packed layout of a [out, in] matrix with G = in / group_size groups per row:
  q2     int32 [out, (G − k4)·group_size / 16]  2-bit codes of the 2-bit groups, in group order
  q4     int32 [out, k4·group_size / 8]          4-bit codes of the 4-bit groups, in group order
  gmap   uint8 [out, ⌈G / 8⌉]                    bit j set: group j is 4-bit
  scale  uint8 [out, G], zero int8 [out, G]      quantized s and lo per group
  super  float16 [out, 2]                        S and L per row
Codes are packed little end first: code i of a word sits at bits [b·i, b·(i+1)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from weightops.errors import WeightopsError

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


class QuantError(WeightopsError):
    """A matrix or setting that the quantizer cannot handle."""


@dataclass
class Packed:
    """One quantized matrix in its stored form (see the module docstring)."""

    shape: tuple[int, int]
    group_size: int
    k4: int
    q2: torch.Tensor
    q4: torch.Tensor
    gmap: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    super: torch.Tensor

    @property
    def bits(self) -> int:
        """Every stored bit: codes, group map, scales, zeros and super-scales."""
        tensors = (self.q2, self.q4, self.gmap, self.scale, self.zero, self.super)
        return sum(t.numel() * t.element_size() * 8 for t in tensors)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / (self.shape[0] * self.shape[1])


def bits_per_weight(in_features: int, group_size: int, k4: int) -> float:
    """Stored bits per weight of a row with k4 4-bit groups, everything counted
    (two fp16 super-scales per row amortised over the row)."""
    g = in_features // group_size
    bits = 2 * (g - k4) * group_size + 4 * k4 * group_size + 16 * g + 8 * math.ceil(g / 8) + 32
    return bits / in_features


def choose_k4(in_features: int, group_size: int, avg_bits: float) -> int:
    """The largest aligned count of 4-bit groups per row within `avg_bits`."""
    g = in_features // group_size
    # Cache-line alignment matters for long rows; short ones keep full freedom.
    step = 4 if g % 4 == 0 and g >= 16 else 1
    best = None
    for k4 in range(0, g + 1, step):
        if bits_per_weight(in_features, group_size, k4) <= avg_bits + 1e-12:
            best = k4
    if best is None:
        floor = bits_per_weight(in_features, group_size, 0)
        raise QuantError(
            f"average {avg_bits} bits per weight is below the all-2-bit floor of {floor:.3f} "
            f"for rows of {in_features} with groups of {group_size}"
        )
    return best


def _check(weight: torch.Tensor, group_size: int) -> None:
    if weight.dim() != 2:
        raise QuantError(f"expected a 2-D weight, got shape {list(weight.shape)}")
    if group_size <= 0 or group_size % 16 != 0:
        raise QuantError(
            f"group size {group_size} must be a positive multiple of 16 (whole packed words)"
        )
    if weight.shape[1] % group_size != 0:
        raise QuantError(
            f"group size {group_size} does not divide the {weight.shape[1]} inputs of a {list(weight.shape)} weight"
        )
    if not torch.isfinite(weight).all():
        raise QuantError("the weight has NaN or Inf entries")


def _grid(
    groups: torch.Tensor, h: torch.Tensor, bits: int, clips: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, low) from the clip factor with the least weighted error."""
    levels = 2**bits - 1
    lo0, hi0 = groups.amin(-1), groups.amax(-1)
    mid = (lo0 + hi0) / 2
    best_err = best_s = best_lo = None
    for c in clips:
        lo = mid - (mid - lo0) * c
        hi = mid + (hi0 - mid) * c
        s = ((hi - lo) / levels).clamp_min(1e-12)
        q = ((groups - lo[..., None]) / s[..., None]).round_().clamp_(0, levels)
        err = ((q * s[..., None] + lo[..., None] - groups).square() * h).sum(-1)
        if best_err is None:
            best_err, best_s, best_lo = err, s, lo
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_lo = torch.where(better, lo, best_lo)
    return best_s, best_lo


def _second_order(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit integers per group against one fp16 super-scale per row."""
    top = 127 if signed else 255
    big = values.abs().amax(-1) if signed else values.amax(-1)
    sup = (big / top).to(torch.float16).float().clamp_min(1e-12)
    q = (values / sup[:, None]).round_().clamp_(-top if signed else 0, top)
    return q, sup


def _codes(groups: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    return ((groups - lo[..., None]) / s[..., None]).round_().clamp_(0, 2**bits - 1)


def quantize(
    weight: torch.Tensor,
    *,
    group_size: int = 64,
    avg_bits: float = 2.85,
    importance: torch.Tensor | None = None,
    k4: int | None = None,
    clip: bool = True,
) -> Packed:
    """Quantize `weight` [out, in] to mixed 2/4-bit groups within `avg_bits` per weight.

    importance: optional [in] non-negative weights of each input (e.g. mean x² of the
    calibration activations) for the clipping search and the choice of 4-bit groups.
    k4: force this many 4-bit groups per row instead of deriving it from avg_bits.
    clip: search clipped ranges (off: plain min-max, to measure what the search buys)."""
    return quantize_with_reference(
        weight, group_size=group_size, avg_bits=avg_bits, importance=importance, k4=k4, clip=clip
    )[0]


def quantize_with_reference(
    weight: torch.Tensor,
    *,
    group_size: int = 64,
    avg_bits: float = 2.85,
    importance: torch.Tensor | None = None,
    k4: int | None = None,
    clip: bool = True,
) -> tuple[Packed, torch.Tensor]:
    """`quantize`, plus the dequantized matrix computed from the codes before packing
    (what a pack/unpack round trip must reproduce exactly)."""
    _check(weight, group_size)
    clips = CLIP_GRID if clip else (1.0,)
    out_f, in_f = weight.shape
    n_groups = in_f // group_size
    if k4 is None:
        k4 = choose_k4(in_f, group_size, avg_bits)
    if not 0 <= k4 <= n_groups:
        raise QuantError(f"k4 = {k4} is outside 0 … {n_groups} groups per row")
    w = weight.detach().float().reshape(out_f, n_groups, group_size)
    h = torch.ones(in_f) if importance is None else importance.detach().float().clamp_min(0)
    if h.shape != (in_f,):
        raise QuantError(f"importance has shape {list(h.shape)}, expected [{in_f}]")
    h = h.reshape(n_groups, group_size)

    # Error of each group at 2 and 4 bits decides which groups get 4.
    errs = {}
    for b in (2, 4):
        s, lo = _grid(w, h, b, clips)
        deq = _codes(w, s, lo, b) * s[..., None] + lo[..., None]
        errs[b] = ((deq - w).square() * h).sum(-1)
    gain = errs[2] - errs[4]
    is4 = torch.zeros(out_f, n_groups, dtype=torch.bool)
    if k4:
        is4.scatter_(1, gain.topk(k4, dim=1).indices, True)

    # Final scales for each group's chosen width, stored two-level, then the codes.
    s2, lo2 = _grid(w, h, 2, clips)
    s4, lo4 = _grid(w, h, 4, clips)
    s = torch.where(is4, s4, s2)
    lo = torch.where(is4, lo4, lo2)
    s_q, s_sup = _second_order(s, signed=False)
    lo_q, lo_sup = _second_order(lo, signed=True)
    s_deq = (s_q * s_sup[:, None]).clamp_min(1e-12)
    lo_deq = lo_q * lo_sup[:, None]
    q2 = _codes(w, s_deq, lo_deq, 2)
    q4 = _codes(w, s_deq, lo_deq, 4)
    codes = torch.where(is4[..., None], q4, q2)
    reference = (codes * s_deq[..., None] + lo_deq[..., None]).reshape(out_f, in_f)
    packed = Packed(
        shape=(out_f, in_f),
        group_size=group_size,
        k4=k4,
        q2=_pack(q2[~is4].reshape(out_f, -1), 2),
        q4=_pack(q4[is4].reshape(out_f, -1), 4),
        gmap=_pack_bits(is4),
        scale=s_q.to(torch.uint8),
        zero=lo_q.to(torch.int8),
        super=torch.stack([s_sup, lo_sup], dim=1).to(torch.float16),
    )
    return packed, reference


def dequantize(p: Packed) -> torch.Tensor:
    """The float32 [out, in] matrix a Packed stands for."""
    out_f, in_f = p.shape
    n_groups = in_f // p.group_size
    is4 = _unpack_bits(p.gmap, n_groups)
    codes = torch.empty(out_f, n_groups, p.group_size)
    codes[~is4] = _unpack(p.q2, 2).reshape(-1, p.group_size).float()
    codes[is4] = _unpack(p.q4, 4).reshape(-1, p.group_size).float()
    sup = p.super.float()
    s = p.scale.float() * sup[:, :1]
    lo = p.zero.float() * sup[:, 1:]
    return (codes * s.clamp_min(1e-12)[..., None] + lo[..., None]).reshape(out_f, in_f)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] codes < 2^bits -> int32 [rows, n·bits/32]."""
    per = 32 // bits
    rows = codes.shape[0]
    c = codes.to(torch.int64).reshape(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)
    # Two's complement into int32: the top code sets bit 31.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return ((w[..., None] >> shifts) & (2**bits - 1)).reshape(words.shape[0], -1)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    rows, n = mask.shape
    padded = torch.zeros(rows, math.ceil(n / 8) * 8, dtype=torch.int64)
    padded[:, :n] = mask.to(torch.int64)
    return (padded.reshape(rows, -1, 8) << torch.arange(8)).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = (packed.to(torch.int64)[..., None] >> torch.arange(8)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :n].bool()
