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

Everything but GPTQ's codes (clip search, refinement, 4-bit choice, scales, rounding) is
independent per row: each pass goes over the matrix in row blocks whose working tensors
stay in cache (weightops.quant.blocks), from the stored dtype to the packed parts, and
what it leaves per group is solved for the whole matrix at once (weightops.quant.grids;
the steps after the grids are weightops.quant.rows). Results do not depend on the block.

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

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from weightops.errors import WeightopsError
from weightops.quant import native, rows
from weightops.quant.blocks import row_blocks, scratch
from weightops.quant.clipsearch import group_extremes
from weightops.quant.gptq import gptq_codes
from weightops.quant.grids import CLIP_GRID, choose_grids
from weightops.quant.packing import unpack_bits as _unpack_bits
from weightops.quant.packing import unpack_codes as _unpack
from weightops.quant.rows import index_dtype

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

    def rows(self, r0: int, r1: int) -> Packed:
        """Rows [r0, r1) of the matrix: every part is stored row by row."""
        parts = {n: t[r0:r1] for n, t in self.parts().items()}
        return Packed((r1 - r0, self.shape[1]), self.group_size, self.k4, **parts)


def bits_per_weight(in_features: int, group_size: int, k4: int, outliers: int = 0) -> float:
    """Stored bits per weight of a row with k4 4-bit groups and `outliers` fp16 outliers,
    everything counted (two fp16 super-scales per row amortised over the row)."""
    g = in_features // group_size
    bits = 2 * (g - k4) * group_size + 4 * k4 * group_size + 16 * g + 8 * math.ceil(g / 8) + 32
    index_bits = 8 * torch.empty((), dtype=index_dtype(in_features)).element_size()
    bits += outliers * (16 + index_bits)
    return bits / in_features


def k4_step(n_groups: int) -> int:
    """The step of a row's 4-bit group count: cache-line alignment matters for long rows;
    short ones keep full freedom."""
    return 4 if n_groups % 4 == 0 and n_groups >= 16 else 1


def choose_k4(in_features: int, group_size: int, avg_bits: float, outliers: int = 0) -> int:
    """The largest aligned count of 4-bit groups per row within `avg_bits`."""
    g = in_features // group_size
    best = None
    for k4 in range(0, g + 1, k4_step(g)):
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
    if not weight.dtype.is_floating_point:
        raise QuantError(f"expected a floating-point weight, got {weight.dtype}")


def quantize(weight: torch.Tensor, **options: Any) -> Packed:
    """Quantize `weight` [out, in] to mixed 2/4-bit groups; the options and what they do
    are those of `quantize_with_reference`, which also returns the dequantized matrix."""
    return _quantize([weight], False, **options)[0]


def quantize_with_error(weight: torch.Tensor, **options: Any) -> tuple[Packed, float]:
    """`quantize`, and the relative error ‖Ŵ − W‖ / ‖W‖ (Frobenius) of the matrix Ŵ the
    packed form dequantizes to, summed row block by row block without building Ŵ."""
    return quantize_together([weight], **options)[0]


def quantize_together(weights: list[torch.Tensor], **options: Any) -> list[tuple[Packed, float]]:
    """`quantize_with_error` for matrices with the same number of inputs, quantized as
    the one matrix of their stacked rows. Every step but GPTQ's is per row, so each comes
    out as it would alone (a Hessian belongs to one matrix); the quantizer's fixed cost
    per call, a few hundred operations on per-group values, is paid once for them all."""
    packed, _, err, w_sq = _quantize(weights, False, **options)
    out, r0 = [], 0
    for w in weights:
        r1 = r0 + w.shape[0]
        rel = math.sqrt(float(err[r0:r1].sum()) / max(float(w_sq[r0:r1].sum()), 1e-60))
        out.append((packed.rows(r0, r1), rel))
        r0 = r1
    return out


def quantize_with_reference(weight: torch.Tensor, **options: Any) -> tuple[Packed, torch.Tensor]:
    """Quantize `weight` [out, in] to mixed 2/4-bit groups within `avg_bits` per weight;
    return the packed form and the dequantized matrix computed from the codes before
    packing (what a pack/unpack round trip must reproduce exactly).

    Options: group_size (64), avg_bits (2.85).
    importance: optional [in] non-negative weights of each input (e.g. mean x² of the
    calibration activations) for the clipping search and the choice of 4-bit groups.
    hessian: optional [in, in] Σ x xᵀ of calibration inputs: codes are then chosen with
    GPTQ-style error feedback (its diagonal is the importance when none is given).
    k4: force this many 4-bit groups per row instead of deriving it from avg_bits.
    clip / refine: the clip search and the least-squares refinement (switches to measure
    what each buys). outliers: fp16 outliers kept per row. damp: added to the Hessian's
    diagonal, as a share of its mean, before inverting it. act_order: with a Hessian,
    feed the error back in order of decreasing Hessian diagonal (GPTQ's act-order)."""
    packed, reference, _, _ = _quantize([weight], True, **options)
    assert reference is not None
    return packed, reference


def _stack(
    weights: list[torch.Tensor], group_size: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The matrices' rows as one float32 [rows, groups, group_size] tensor, and its
    groups' (min, max), taken from each row block while it is in cache."""
    if not weights:
        raise QuantError("no matrix to quantize")
    for weight in weights:
        _check(weight, group_size)
    in_f = weights[0].shape[1]
    if any(w.shape[1] != in_f for w in weights):
        shapes = ", ".join(str(list(w.shape)) for w in weights)
        raise QuantError(f"matrices quantized together need the same inputs, got {shapes}")
    if len(weights) == 1 and weights[0].dtype == torch.float32:
        w = weights[0].detach().reshape(-1, in_f // group_size, group_size)
        return w, group_extremes(w)
    # Into memory every matrix reuses (weightops.quant.blocks): a fresh float32 copy
    # of each would be new pages for the kernel to map.
    w = scratch("weight", (sum(w.shape[0] for w in weights), in_f // group_size, group_size))
    lo, hi = w.new_empty(2, *w.shape[:-1]).unbind(0)
    r0 = 0
    for weight in weights:
        source = weight.detach().reshape(-1, *w.shape[1:])
        if native.ready(source, torch.bfloat16):
            at = slice(r0, r0 + source.shape[0])
            native.run("wo_stack_bf16", lo[at].numel(), source, w[at], lo[at], hi[at], group_size)
            r0 += weight.shape[0]
            continue
        for block in row_blocks(source):
            at = slice(r0 + block.start, r0 + block.stop)
            w[at].copy_(source[block])
            torch.amin(w[at], -1, out=lo[at])
            torch.amax(w[at], -1, out=hi[at])
        r0 += weight.shape[0]
    return w, (lo, hi)


def _quantize(
    weights: list[torch.Tensor], want_reference: bool, **options: Any
) -> tuple[Packed, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`_quantize_on`, with torch's threads set aside for the native kernels where they
    do the passes over the weights: without a Hessian, importance or outliers (each of
    which weighs the weights, a case the kernels leave to torch; weightops.quant.native)."""
    plain = all(options.get(key) is None for key in ("hessian", "importance"))
    plain = plain and not options.get("outliers")
    with native.torch_aside() if plain and native.library() else contextlib.nullcontext():
        return _quantize_on(weights, want_reference, **options)


def _quantize_on(
    weights: list[torch.Tensor],
    want_reference: bool,
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
) -> tuple[Packed, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(packed, dequantized matrix if wanted, squared error and squared norm per row in
    float64) of the stacked rows of `weights`: `quantize_with_reference`."""
    w, extremes = _stack(weights, group_size)
    clips = CLIP_GRID if clip else (1.0,)
    out_f, n_groups, _ = w.shape
    in_f = n_groups * group_size
    if not 0 <= outliers <= in_f:
        raise QuantError(f"{outliers} outliers per row is outside 0 … {in_f}")
    if k4 is None:
        k4 = choose_k4(in_f, group_size, avg_bits, outliers)
    if not 0 <= k4 <= n_groups:
        raise QuantError(f"k4 = {k4} is outside 0 … {n_groups} groups per row")
    if hessian is not None and len(weights) != 1:
        raise QuantError("a Hessian belongs to one matrix: quantize the others apart")
    if hessian is not None and hessian.shape != (in_f, in_f):
        raise QuantError(f"hessian has shape {list(hessian.shape)}, expected [{in_f}, {in_f}]")
    if importance is None and hessian is not None:
        importance = hessian.diagonal()
    h = None
    if importance is not None:
        h = importance.detach().float().clamp_min(0)
        if h.shape != (in_f,):
            raise QuantError(f"importance has shape {list(h.shape)}, expected [{in_f}]")
        h = h.reshape(n_groups, group_size)
    parts = rows.empty_parts(out_f, in_f, group_size, k4, outliers)
    fit, outlier = w, None
    if outliers:
        if not torch.isfinite(w).all():
            raise QuantError("the weight has NaN or Inf entries")
        outlier = rows.pick_outliers(w, h, outliers)
        keep = ~outlier.reshape(w.shape)
        # Outliers get no say in their group's grid: zero weight in the error, and a
        # stand-in value (the mean of the rest) that cannot widen the range.
        h = keep.float() if h is None else h * keep
        rest = (w * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1)
        fit = torch.where(keep, w, rest)
    try:
        is4, s, lo = choose_grids(fit, h, k4, clips, refine, extremes if fit is w else None)
    except ValueError as e:
        raise QuantError(str(e)) from None
    # Final scales for each group's chosen width, stored two-level, then the codes.
    s_deq, lo_deq = rows.store_grids(parts, is4, s, lo)
    if not bool(torch.isfinite(parts["super"]).all()):
        raise QuantError(
            "the weight has values too large for the packed format: a row's fp16 "
            "super-scale overflows (|w| above about 1e7)"
        )
    reference = None
    if want_reference or hessian is not None or outlier is not None:
        reference = torch.empty(out_f, in_f)
    if hessian is not None:
        codes, seen = gptq_codes(
            w.reshape(out_f, in_f),
            hessian,
            s_deq,
            lo_deq,
            is4,
            group_size,
            outlier,
            damp,
            act_order=act_order,
        )
        codes = codes.reshape(w.shape)
        torch.mul(codes, s_deq[..., None], out=reference.view(w.shape)).add_(lo_deq[..., None])
        w_sq = torch.linalg.vector_norm(w, dim=(-2, -1), dtype=torch.float64).square_()
    else:
        seen = w
        packed_now = rows.round_packed(parts, w, is4, s_deq, lo_deq) if reference is None else None
        if packed_now is not None:
            codes, (sq_err, w_sq) = None, packed_now
        else:
            codes, sq_err, w_sq = rows.round_codes(w, is4, s_deq, lo_deq, reference)
    if codes is not None:
        rows.store_codes(parts, codes, is4)
    if outlier is not None:
        rows.store_outliers(parts, outlier, seen, reference)
    if reference is not None:
        diff = reference - w.reshape(out_f, in_f)
        sq_err = torch.linalg.vector_norm(diff, dim=-1, dtype=torch.float64).square_()
    packed = Packed(shape=(out_f, in_f), group_size=group_size, k4=k4, **parts)
    return packed, reference if want_reference else None, sq_err, w_sq


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
