"""Mixed 2/4-bit group quantization of one weight matrix, and its packed form.

The scheme follows Li et al. ("Enabling Fast 2-bit LLM on GPUs: Memory Alignment and
Asynchronous Dequantization"): weights are quantized in groups of `group_size`
consecutive inputs of one output row; most groups get 2 bits, the groups where 4 bits
remove the most error get 4 bits.

Per group (asymmetric): w ≈ lo + q·s with q ∈ [0, 2ᵇ − 1]. The range is clipped by the
factor (from a grid) that minimises the group's squared error, weighted by a
per-input importance h (the diagonal of the calibration Hessian, mean x²) when given.

After the clip search, each group's (s, lo) is refined by alternating least squares: with
the codes fixed, the weighted least-squares line through (q, w) gives s and lo; with s
and lo fixed, rounding gives the codes. Each half-step can only lower the group's error,
so the error never rises above the clip search's (bench/bench_quant.py shows the gain).

With a calibration Hessian H = Σ x xᵀ of the layer's inputs, the codes are chosen
GPTQ-style (Frantar et al. 2023) instead of by rounding each weight alone: inputs are
quantized one at a time, by decreasing Hessian diagonal (act-order), and each one's
rounding error, scaled by the inverse Hessian's
Cholesky factor, is pushed onto the inputs not yet quantized, which minimises the
layer's output error ‖(W − Ŵ) X‖ rather than ‖W − Ŵ‖. The group grids (width, s, lo)
are fixed from the original weights first ("static groups"), so the layout and the
stored scales do not depend on the order (the loop itself is weightops.quant.gptq).

Everything before the codes (outliers, clip search, refinement, 4-bit choice, scales) is
independent per row, so rows go through it in blocks of about BLOCK_VALUES values per
thread (weightops.quant.grids does the work, vectorised over the block's rows and groups):
the working tensors stay in cache instead of streaming
the whole matrix through memory once per operation. Results do not depend on the block.

Optional sparse outliers: `outliers` weights per row, taken from the 2-bit groups where
they are largest relative to their group, are stored exactly in fp16 with their column
index, and left out of their group's range, so one large weight no longer widens the
grid of the 63 others.

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
  oidx   int16 or int32 [out, n], oval float16 [out, n]   only with n > 0 outliers per
         row: their columns (int32 when a row has more than 32767 inputs) and values
Codes are packed little end first: code i of a word sits at bits [b·i, b·(i+1)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from weightops.errors import WeightopsError
from weightops.quant.gptq import gptq_codes
from weightops.quant.grids import CLIP_GRID, choose_grids
from weightops.quant.packing import pack_bits as _pack_bits
from weightops.quant.packing import pack_codes as _pack
from weightops.quant.packing import unpack_bits as _unpack_bits
from weightops.quant.packing import unpack_codes as _unpack

# Values of one row block per thread in the grid choice: two megabytes of float32 per
# working tensor, about what a core's cache holds.
BLOCK_VALUES = 1 << 19
PARTS = ("q2", "q4", "gmap", "scale", "zero", "super")
OUTLIER_PARTS = ("oidx", "oval")


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
    oidx: torch.Tensor | None = None
    oval: torch.Tensor | None = None

    @property
    def outliers(self) -> int:
        return 0 if self.oidx is None else self.oidx.shape[1]

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors by part name (outlier parts only when there are outliers)."""
        names = PARTS + (OUTLIER_PARTS if self.outliers else ())
        return {n: getattr(self, n) for n in names}

    @property
    def bits(self) -> int:
        """Every stored bit: codes, group map, scales, zeros, super-scales, outliers."""
        return sum(t.numel() * t.element_size() * 8 for t in self.parts().values())

    @property
    def bits_per_weight(self) -> float:
        return self.bits / (self.shape[0] * self.shape[1])


def index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= 2**15 - 1 else torch.int32


def bits_per_weight(in_features: int, group_size: int, k4: int, outliers: int = 0) -> float:
    """Stored bits per weight of a row with k4 4-bit groups and `outliers` fp16 outliers,
    everything counted (two fp16 super-scales per row amortised over the row)."""
    g = in_features // group_size
    bits = 2 * (g - k4) * group_size + 4 * k4 * group_size + 16 * g + 8 * math.ceil(g / 8) + 32
    index_bits = 8 * torch.empty((), dtype=index_dtype(in_features)).element_size()
    bits += outliers * (16 + index_bits)
    return bits / in_features


def choose_k4(in_features: int, group_size: int, avg_bits: float, outliers: int = 0) -> int:
    """The largest aligned count of 4-bit groups per row within `avg_bits`."""
    g = in_features // group_size
    # Cache-line alignment matters for long rows; short ones keep full freedom.
    step = 4 if g % 4 == 0 and g >= 16 else 1
    best = None
    for k4 in range(0, g + 1, step):
        if bits_per_weight(in_features, group_size, k4, outliers) <= avg_bits + 1e-12:
            best = k4
    if best is None:
        floor = bits_per_weight(in_features, group_size, 0, outliers)
        with_outliers = f" and {outliers} outliers" if outliers else ""
        raise QuantError(
            f"average {avg_bits} bits per weight is below the all-2-bit floor of {floor:.3f} "
            f"for rows of {in_features} with groups of {group_size}{with_outliers}"
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
    # One pass: NaN and infinities carry into a float64 sum, which no float32 can overflow.
    if not torch.isfinite(weight.sum(dtype=torch.float64)):
        raise QuantError("the weight has NaN or Inf entries")


def _second_order(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit integers per group against one fp16 super-scale per row."""
    top = 127 if signed else 255
    big = values.abs().amax(-1) if signed else values.amax(-1)
    sup = (big / top).to(torch.float16).float().clamp_min(1e-12)
    q = (values / sup[:, None]).round_().clamp_(-top if signed else 0, top)
    return q, sup


def _codes(groups: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    return (groups - lo[..., None]).div_(s[..., None]).round_().clamp_(0, 2**bits - 1)


def _pick_outliers(w: torch.Tensor, h: torch.Tensor | None, n: int) -> torch.Tensor:
    """[out, in] mask of the n entries per row farthest from their group's mean, weighted
    by importance (ties in index order)."""
    out_f = w.shape[0]
    score = (w - w.mean(-1, keepdim=True)).square()
    if h is not None:
        score = score * h
    # A stable descending sort keeps the choice independent of the backend's topk order.
    idx = score.reshape(out_f, -1).argsort(dim=1, descending=True, stable=True)[:, :n]
    mask = torch.zeros(out_f, score[0].numel(), dtype=torch.bool)
    return mask.scatter_(1, idx, True)


def _block_rows(row_values: int) -> int:
    """Rows per block such that the grid choice's working tensors stay in cache, larger
    with more threads so each thread's share of an operation stays that size."""
    return max(1, BLOCK_VALUES * torch.get_num_threads() // row_values)


def quantize(weight: torch.Tensor, **options: Any) -> Packed:
    """Quantize `weight` [out, in] to mixed 2/4-bit groups; the options and what they do
    are those of `quantize_with_reference`, which also returns the dequantized matrix."""
    return quantize_with_reference(weight, **options)[0]


def quantize_with_reference(
    weight: torch.Tensor,
    *,
    group_size: int = 64,
    avg_bits: float = 2.85,
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    k4: int | None = None,
    clip: bool = True,
    refine: bool = True,
    outliers: int = 0,
    damp: float = 0.01,
    act_order: bool = True,
) -> tuple[Packed, torch.Tensor]:
    """Quantize `weight` [out, in] to mixed 2/4-bit groups within `avg_bits` per weight;
    return the packed form and the dequantized matrix computed from the codes before
    packing (what a pack/unpack round trip must reproduce exactly).

    importance: optional [in] non-negative weights of each input (e.g. mean x² of the
    calibration activations) for the clipping search and the choice of 4-bit groups.
    hessian: optional [in, in] Σ x xᵀ of calibration inputs: codes are then chosen with
    GPTQ-style error feedback (its diagonal is the importance when none is given).
    k4: force this many 4-bit groups per row instead of deriving it from avg_bits.
    clip / refine: the clip search and the least-squares refinement (switches to measure
    what each buys). outliers: fp16 outliers kept per row. damp: added to the Hessian's
    diagonal, as a share of its mean, before inverting it. act_order: with a Hessian,
    feed the error back in order of decreasing Hessian diagonal (GPTQ's act-order)."""
    _check(weight, group_size)
    clips = CLIP_GRID if clip else (1.0,)
    out_f, in_f = weight.shape
    n_groups = in_f // group_size
    if not 0 <= outliers <= in_f:
        raise QuantError(f"{outliers} outliers per row is outside 0 … {in_f}")
    if k4 is None:
        k4 = choose_k4(in_f, group_size, avg_bits, outliers)
    if not 0 <= k4 <= n_groups:
        raise QuantError(f"k4 = {k4} is outside 0 … {n_groups} groups per row")
    if hessian is not None and hessian.shape != (in_f, in_f):
        raise QuantError(f"hessian has shape {list(hessian.shape)}, expected [{in_f}, {in_f}]")
    if importance is None and hessian is not None:
        importance = hessian.diagonal()
    w = weight.detach().float().reshape(out_f, n_groups, group_size)
    h = None
    if importance is not None:
        h = importance.detach().float().clamp_min(0)
        if h.shape != (in_f,):
            raise QuantError(f"importance has shape {list(h.shape)}, expected [{in_f}]")
        h = h.reshape(n_groups, group_size)

    outlier = None
    fit = w
    if outliers:
        outlier = _pick_outliers(w, h, outliers)
        keep = ~outlier.reshape(out_f, n_groups, group_size)
        # Outliers get no say in their group's grid: zero weight in the error, and a
        # stand-in value (the mean of the rest) that cannot widen the range.
        h = keep.float() if h is None else h * keep
        rest = (w * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1)
        fit = torch.where(keep, w, rest)

    # Everything up to the codes is independent per row: rows go in blocks whose working
    # tensors stay in cache (the results do not depend on the block size).
    rows = _block_rows(in_f)
    blocks = [
        choose_grids(
            fit[r : r + rows],
            h[r : r + rows] if h is not None and h.dim() == 3 else h,
            k4,
            clips,
            refine,
        )
        for r in range(0, out_f, rows)
    ]
    is4, s, lo = (torch.cat(parts) for parts in zip(*blocks, strict=True))

    # Final scales for each group's chosen width, stored two-level, then the codes.
    s_q, s_sup = _second_order(s, signed=False)
    lo_q, lo_sup = _second_order(lo, signed=True)
    s_deq = (s_q * s_sup[:, None]).clamp_min(1e-12)
    lo_deq = lo_q * lo_sup[:, None]
    if hessian is not None:
        codes, seen = gptq_codes(
            weight.detach().float(),
            hessian,
            s_deq,
            lo_deq,
            is4,
            group_size,
            outlier,
            damp,
            act_order=act_order,
        )
        codes = codes.reshape(out_f, n_groups, group_size)
    else:
        # Clamping to [0, 3] or [0, 15] per group in one pass, as rounding to each width.
        top = torch.where(is4, 15.0, 3.0)[..., None]
        codes = (w - lo_deq[..., None]).div_(s_deq[..., None]).round_().clamp_(min=0)
        codes = torch.minimum(codes, top, out=codes)
        seen = weight.detach().float()
    reference = (codes * s_deq[..., None] + lo_deq[..., None]).reshape(out_f, in_f)
    oidx = oval = None
    if outlier is not None:
        cols = outlier.nonzero()[:, 1].reshape(out_f, outliers)
        oval = seen.gather(1, cols).half()
        oidx = cols.to(index_dtype(in_f))
        reference.scatter_(1, cols, oval.float())
    packed = Packed(
        shape=(out_f, in_f),
        group_size=group_size,
        k4=k4,
        q2=_pack(_groups_of(codes, ~is4), 2),
        q4=_pack(_groups_of(codes, is4), 4),
        gmap=_pack_bits(is4),
        scale=s_q.to(torch.uint8),
        zero=lo_q.to(torch.int8),
        super=torch.stack([s_sup, lo_sup], dim=1).to(torch.float16),
        oidx=oidx,
        oval=oval,
    )
    return packed, reference


def _groups_of(codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[out, n·group_size]: each row's groups where `mask` is set (the same count in every
    row), in group order."""
    out_f, _, group_size = codes.shape
    idx = mask.nonzero()[:, 1].reshape(out_f, -1)
    return codes.gather(1, idx[..., None].expand(-1, -1, group_size)).reshape(out_f, -1)


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
    w = (codes * s.clamp_min(1e-12)[..., None] + lo[..., None]).reshape(out_f, in_f)
    if p.outliers:
        w.scatter_(1, p.oidx.long(), p.oval.float())
    return w
