"""The group grids of the mixed 2/4-bit quantizer: clip search, least-squares refinement,
and the choice of the 4-bit groups (the scheme is described in weightops.quant.mixed).

A group of weights g is quantized to w ≈ lo + q·s, q ∈ [0, L] (L = 2ᵇ − 1), on the grid
of its min–max range shrunk around its middle by a clip factor c. With the middle m and
half-range r of the group, and x = |g − m| / r ∈ [0, 1], the grid's levels sit at
±c·(2k + 1)/L in units of r, so each weight's error depends only on x and c:

    error / r² = Σ h (c·(2k + 1)/L − x)²,  k = min(⌊x·L / (2c)⌋, (L − 1)/2).

At 2 bits the clip search and the first refinement step come from one pass of
per-bucket sums (weightops.quant.clipsearch).

Six factors (1.0 down to 0.5) and two steps (the one from the search's sums and one
more) reach the error of a 21-factor search with two steps (on SmolLM2-135M, mean
relative error within 0.01%), for fewer sums per group to solve. The refinement's last
least-squares step already holds the sums that give each group's error for its codes on
the new grid, so the 2-bit error needs no further pass. A group's gain from 4 bits is that error less the 4-bit
rounding noise of its range (s²/12 per weight, s = 2r/15): 4 bits leave a few percent of
the 2-bit error, and estimating them saves computing 4-bit grids for the groups that stay
2-bit. Only the k4 chosen groups per row then get a 4-bit grid: their range shrunk by
0.95 and two refinement steps (a search over three factors and four steps there would
lower the mean relative error by less than 0.02%: the refinement does the work at 4
bits).

Every pass goes over the matrix in row blocks (weightops.quant.blocks); the per-group
sums it leaves are solved for the whole matrix at once.
"""

from __future__ import annotations

import torch

from weightops.quant import native
from weightops.quant.blocks import row_blocks, scratch
from weightops.quant.clipsearch import group_extremes as _extremes
from weightops.quant.clipsearch import importance_rows as _rows
from weightops.quant.clipsearch import search_2bit as _search_2bit
from weightops.quant.clipsearch import solve_line as _solve

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
REFINE_STEPS = 4
# The factors of the 2-bit and the 4-bit search, and the 2-bit refinement steps (module
# doc; the first step comes with the search).
CLIP2 = tuple(round(1.0 - 0.1 * i, 3) for i in range(6))
REFINE_STEPS_2 = 2
CLIP4 = (0.95,)
REFINE_STEPS_4 = 2


def sq_error(
    groups: torch.Tensor, h: torch.Tensor | None, s: torch.Tensor, lo: torch.Tensor, levels: int
) -> torch.Tensor:
    """Weighted squared error per group of rounding to the grid (s, lo)."""
    err = groups.new_empty(groups.shape[:-1])
    for rows in row_blocks(groups):
        g = groups[rows]
        s_b, lo_b = s[rows][..., None], lo[rows][..., None]
        x = torch.sub(g, lo_b, out=scratch("sq_error", tuple(g.shape), g.dtype))
        x.div_(s_b).round_().clamp_(0, levels).mul_(s_b).add_(lo_b).sub_(g)
        h_b = _rows(h, groups, rows)
        if h_b is None:
            torch.linalg.vector_norm(x, dim=-1, out=err[rows])
        else:
            torch.sum(x.square_().mul_(h_b), -1, out=err[rows])
    return err.square_() if h is None else err


def _grid(
    groups: torch.Tensor,
    h: torch.Tensor | None,
    bits: int,
    clips: tuple[float, ...],
    extremes: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, low) from the clip factor with the least weighted error (h None:
    every input counts the same), each factor's error measured by rounding; ties go to the
    earlier factor. extremes: the groups' (min, max), if known."""
    levels = 2**bits - 1
    lo0, hi0 = extremes or _extremes(groups)
    mid = (lo0 + hi0) / 2
    best: tuple[torch.Tensor, ...] = ()
    for c in clips:
        lo = mid - (mid - lo0) * c
        hi = mid + (hi0 - mid) * c
        s = ((hi - lo) / levels).clamp_min(1e-12)
        if len(clips) == 1:
            return s, lo
        err = sq_error(groups, h, s, lo, levels)
        if best:
            better = err < best[0]
            err, s, lo = (
                torch.where(better, new, old) for new, old in zip((err, s, lo), best, strict=True)
            )
        best = err, s, lo
    return best[1], best[2]


def _refine(
    groups: torch.Tensor,
    h: torch.Tensor | None,
    s: torch.Tensor,
    lo: torch.Tensor,
    bits: int,
    steps: int = REFINE_STEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating least squares on (s, lo) for fixed codes, then codes for fixed (s, lo)
    (h None: every input counts the same)."""
    return _refine_with_error(groups, h, s, lo, bits, steps)[:2]


def _refine_with_error(
    groups: torch.Tensor,
    h: torch.Tensor | None,
    s: torch.Tensor,
    lo: torch.Tensor,
    bits: int,
    steps: int = REFINE_STEPS,
    totals: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_refine`, and each group's error for the last codes on the final grid: an upper
    bound of its error after rounding to that grid again, from the sums the last step
    already has (no pass over the weights). totals: each group's Σh, Σhg and Σhg², if
    known."""
    if not steps:
        return s, lo, sq_error(groups, h, s, lo, 2**bits - 1)
    lead = groups.shape[:-1]
    # Σh, Σhg, Σhg² (taken in the first step's pass), then Σhq², Σhq, Σhqg per step.
    c, e, g2, a, b, d = groups.new_empty(6, *lead).unbind(0)
    if totals is not None:
        c, e, g2 = totals
    elif h is None:
        c.fill_(groups.shape[-1])
    for step in range(steps):
        first = not step and totals is None
        if h is None and not first and native.ready(groups):
            # This step and the rest, each fused with its error (native.c).
            dense = torch.contiguous_format
            s, lo = s.clone(memory_format=dense), lo.clone(memory_format=dense)
            err = torch.empty_like(s)
            sums = [t.contiguous() for t in (c, e, g2)]
            for _ in range(steps - step):
                native.run(
                    "wo_refine_step", s.numel(), groups, s, lo, *sums, float(2**bits - 1),
                    err, groups.shape[-1],
                )  # fmt: skip
            return s, lo, err
        inv = 1 / s
        lo_inv = lo * inv
        for rows in row_blocks(groups):
            g = groups[rows]
            q = torch.mul(g, inv[rows][..., None], out=scratch("refine_q", tuple(g.shape), g.dtype))
            q.sub_(lo_inv[rows][..., None]).round_().clamp_(0, 2**bits - 1)
            hq = scratch("refine_hq", tuple(g.shape), g.dtype)
            h_b = _rows(h, groups, rows)
            if h_b is None:
                if first:
                    torch.sum(g, -1, out=e[rows])
                    torch.linalg.vector_norm(g, dim=-1, out=g2[rows])
                torch.linalg.vector_norm(q, dim=-1, out=a[rows])
                torch.sum(q, -1, out=b[rows])
                torch.sum(torch.mul(q, g, out=hq), -1, out=d[rows])
                continue
            hg = torch.mul(g, h_b, out=scratch("refine_hg", tuple(g.shape), g.dtype))
            if first:
                torch.sum(h_b.expand(g.shape), -1, out=c[rows])
                torch.sum(hg, -1, out=e[rows])
                torch.sum(torch.mul(hg, g, out=hq), -1, out=g2[rows])
            torch.sum(torch.mul(q, hg, out=hq), -1, out=d[rows])
            torch.sum(torch.mul(q, h_b, out=hq), -1, out=b[rows])
            torch.sum(hq.mul_(q), -1, out=a[rows])
        if h is None:
            # Codes are small integers: Σq² is exact, whatever rounding the norm adds.
            a.square_().round_()
            if first:
                g2.square_()
        s, lo = _solve(a, b, d, c, e, s, lo)
    # Σ h (q·s + lo − g)² expanded in the sums of the last step.
    err = s * s * a + 2 * s * lo * b + lo * lo * c - 2 * s * d - 2 * lo * e + g2
    return s, lo, err.clamp_min_(0)


def choose_grids(
    fit: torch.Tensor,
    h: torch.Tensor | None,
    k4: int,
    clips: tuple[float, ...],
    refine: bool,
    extremes: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows of groups [rows, G, group_size]: which groups are 4-bit (the k4 per row
    where 4 bits remove the most error) and every group's (s, lo) at its width.
    extremes: the groups' (min, max), if known. Raises ValueError if a weight is NaN or
    infinite."""
    rows, n_groups, group_size = fit.shape
    extremes = extremes or _extremes(fit)
    # NaN and infinities reach the groups' extremes, and from them the least minimum or
    # the largest maximum (amin and amax keep a NaN): two reductions, no pass of its own.
    lo, hi = extremes
    if not bool(torch.isfinite(torch.stack([lo.amin(), hi.amax()])).all()):
        raise ValueError("the weight has NaN or Inf entries")
    # A group's middle and half-range must be float32 numbers too.
    if not bool(torch.isfinite(torch.stack([(hi - lo).amax(), (hi + lo).abs().amax()])).all()):
        raise ValueError(
            "the weight has values too large to quantize: a group's range passes the "
            "float32 limit (3.4e38)"
        )
    is4 = torch.zeros(rows, n_groups, dtype=torch.bool)
    if k4 == n_groups:
        s, lo = _grid(fit, h, 4, clips, extremes)
        s, lo = _refine(fit, h, s, lo, 4) if refine else (s, lo)
        return is4.fill_(True), s, lo
    clips2 = CLIP2 if clips == CLIP_GRID else clips
    factor, err2, s, lo, *totals = _search_2bit(fit, h, clips2, extremes, not refine)
    r = (extremes[1] - extremes[0]) * 0.5
    if refine:
        s, lo, err2 = _refine_with_error(fit, h, s, lo, 2, REFINE_STEPS_2 - 1, tuple(totals))
    else:
        rc = r * factor
        s, lo = (rc * (2 / 3)).clamp_min_(1e-12), (extremes[0] + extremes[1]) * 0.5 - rc
        err2 = err2 * r * r
    if not k4:
        return is4, s, lo
    # 4 bits leave a small fraction of the 2-bit error; which groups gain most is decided
    # by the 2-bit error, less the 4-bit rounding noise of the group's range (s²/12 per
    # weight, s = 2r/15), so no pass is spent on 4-bit grids of groups that stay 2-bit.
    weight = group_size if h is None else h.sum(-1).expand_as(r)
    gain = err2.sub_((r * r).mul_(weight).mul_((2 / 15) ** 2 / 12))
    is4.scatter_(1, gain.topk(k4, dim=1).indices, True)
    # The 4-bit groups' flat positions, in row-major order, found once for every gather.
    at4 = is4.reshape(-1).nonzero().squeeze(1)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).index_select(0, at4)

    f4 = fit.reshape(-1, group_size).index_select(0, at4)
    h4 = None if h is None else h.expand_as(fit)[is4]
    s4, lo4 = _grid(f4, h4, 4, CLIP4 if clips == CLIP_GRID else clips, tuple(map(pick, extremes)))
    if refine:
        totals4 = tuple(map(pick, totals))
        s4, lo4, _ = _refine_with_error(f4, h4, s4, lo4, 4, REFINE_STEPS_4, totals4)
    s, lo = s.contiguous(), lo.contiguous()
    s.view(-1).index_copy_(0, at4, s4)
    lo.view(-1).index_copy_(0, at4, lo4)
    return is4, s, lo
