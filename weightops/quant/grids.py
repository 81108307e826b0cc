"""The group grids of the mixed 2/4-bit quantizer: clip search, least-squares refinement,
and the choice of the 4-bit groups (the scheme is described in weightops.quant.mixed).

A group of weights g is quantized to w ≈ lo + q·s, q ∈ [0, L] (L = 2ᵇ − 1), on the grid
of its min–max range shrunk around its middle by a clip factor c. With the middle m and
half-range r of the group, and x = |g − m| / r ∈ [0, 1], the grid's levels sit at
±c·(2k + 1)/L in units of r, so each weight's error depends only on x and c:

    error / r² = Σ h (c·(2k + 1)/L − x)²,  k = min(⌊x·L / (2c)⌋, (L − 1)/2).

At 2 bits k is 0 or 1, decided by whether x ≥ 2c/3. Sorting every weight into the
bucket between consecutive thresholds 2c/3 of the clip factors (evenly spaced, so the
bucket is one floor), and summing h and h·x per bucket, gives every factor's error as a
fixed linear combination of those sums: one pass over the weights and one small matrix
product for all factors together, instead of one rounding pass per factor.

The buckets are kept per side of the middle ("keys"), which also fixes every weight's
code on the chosen grid: 1 or 0 below the middle, inside or outside the threshold, 2 or
3 above it. The sums of the first least-squares step of the refinement (Σhq², Σhq,
Σhqg) are then sums over keys, so that step needs no pass over the weights either. With
v = (g − m)·k/r shifted by the number of cells, k = 1.5 / the factors' spacing, the
thresholds fall on integers, and a weight's key is ⌊v⌋ clamped: three operations.

Six factors (1.0 down to 0.5) and two steps (the one from the keys and one more) reach
the error of a 21-factor search with two steps (on SmolLM2-135M, mean relative error
within 0.01%), for fewer key sums per group to solve. The refinement's last least-squares step already
holds the sums that give each group's error for its codes on the new grid, so the 2-bit
error needs no further pass. A group's gain from 4 bits is that error less the 4-bit
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

import functools
import itertools

import torch

from weightops.quant.blocks import ones, row_blocks, scratch

# Rows of the clip search's per-bucket sums held at once, in weight values.
CHUNK_VALUES = 1 << 20

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
REFINE_STEPS = 4
# The factors of the 2-bit and the 4-bit search, and the 2-bit refinement steps (module
# doc; the first step comes with the search).
CLIP2 = tuple(round(1.0 - 0.1 * i, 3) for i in range(6))
REFINE_STEPS_2 = 2
CLIP4 = (0.95,)
REFINE_STEPS_4 = 2


def _rows(h: torch.Tensor | None, groups: torch.Tensor, rows: slice) -> torch.Tensor | None:
    """The importance of a row block: h holds one row per group row, or broadcasts."""
    return h[rows] if h is not None and h.shape == groups.shape else h


def _extremes(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = groups.new_empty(groups.shape[:-1]), groups.new_empty(groups.shape[:-1])
    for rows in row_blocks(groups):
        torch.amin(groups[rows], -1, out=lo[rows])
        torch.amax(groups[rows], -1, out=hi[rows])
    return lo, hi


def _sq_error(
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
        err = _sq_error(groups, h, s, lo, levels)
        if best:
            better = err < best[0]
            err, s, lo = (
                torch.where(better, new, old) for new, old in zip((err, s, lo), best, strict=True)
            )
        best = err, s, lo
    return best[1], best[2]


def _solve(
    a: torch.Tensor,
    b: torch.Tensor,
    d: torch.Tensor,
    c: torch.Tensor,
    e: torch.Tensor,
    s: torch.Tensor,
    lo: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted least-squares line g ≈ lo + q·s through a group's (code, weight)
    pairs, from a = Σhq², b = Σhq, d = Σhqg, c = Σh, e = Σhg; (s, lo) where it is not
    unique or not increasing."""
    det = a * c - b * b
    s_new = (c * d - b * e) / det.clamp_min(1e-30)
    lo_new = (e - b * s_new) / c.clamp_min(1e-30)
    # A group whose codes are all equal (or whose weights all count zero) has no
    # unique line; a non-positive slope would flip the grid. Both keep their grid.
    ok = (det > 1e-9 * (a * c).clamp_min(1e-30)) & (s_new > 1e-12)
    return torch.where(ok, s_new, s), torch.where(ok, lo_new, lo)


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
        return s, lo, _sq_error(groups, h, s, lo, 2**bits - 1)
    lead = groups.shape[:-1]
    # Σh, Σhg, Σhg² (taken in the first step's pass), then Σhq², Σhq, Σhqg per step.
    c, e, g2, a, b, d = groups.new_empty(6, *lead).unbind(0)
    if totals is not None:
        c, e, g2 = totals
    elif h is None:
        c.fill_(groups.shape[-1])
    for step in range(steps):
        first = not step and totals is None
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


def _search_2bit(
    groups: torch.Tensor,
    h: torch.Tensor | None,
    clips: tuple[float, ...],
    extremes: tuple[torch.Tensor, torch.Tensor] | None = None,
    need_error: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The 2-bit clip search over `clips` and the first refinement step from the chosen
    grid, both from one pass of per-key sums (module docstring). Returns, per group, the
    factor (ties go to the earlier one), its error in units of r² (with need_error, else
    zeros), and (s, lo) after the step; then Σh, Σhg and Σhg², for the next steps."""
    lo0, hi0 = extremes or _extremes(groups)
    lead = groups.shape[:-1]
    out = groups.new_zeros(7, *lead)
    # The key sums take 0.7 values per weight: made and used a chunk of rows at a time.
    for rows in row_blocks(groups, CHUNK_VALUES):
        h_rows = _rows(h, groups, rows)
        parts = _search_chunk(groups[rows], h_rows, clips, lo0[rows], hi0[rows], need_error)
        for o, p in zip(out, parts, strict=True):
            o[rows] = p.reshape(o[rows].shape)
    return tuple(out.unbind(0))


def _search_chunk(
    groups: torch.Tensor,
    h: torch.Tensor | None,
    clips: tuple[float, ...],
    lo0: torch.Tensor,
    hi0: torch.Tensor,
    need_error: bool,
) -> tuple[torch.Tensor, ...]:
    mid, r = (lo0 + hi0) * 0.5, (hi0 - lo0) * 0.5
    n, k, off = _key_layout(clips)
    cells = n - off + 1
    scale = torch.where(r > 0, k / r, torch.zeros_like(r))
    lead = groups.shape[:-1]
    # Per group and key: Σh and Σh·v', where v' = (g − m)·k/r + cells, and Σh·v'².
    sums = scratch("search_sums", (*lead, 2, 2 * cells), groups.dtype).zero_()
    quad = groups.new_empty(lead)
    for rows in row_blocks(groups):
        g = groups[rows]
        shape = tuple(g.shape)
        v = torch.sub(g, mid[rows][..., None], out=scratch("search_v", shape, g.dtype))
        v.mul_(scale[rows][..., None]).add_(cells)
        # The thresholds 2c/3 of x = |g − m|/r fall on integers of |v' − cells| (below
        # the middle, on the cell edges counted from the other end): the key is the
        # cell, the weights beyond the last threshold sharing the outermost ones. A
        # weight on a threshold is as far from both levels, so either side of it gives
        # it the same error.
        key = torch.floor(v, out=scratch("search_key", shape, g.dtype)).clamp_(0, 2 * cells - 1)
        idx = scratch("search_idx", shape, torch.int64).copy_(key)
        h_b = _rows(h, groups, rows)
        if h_b is None:
            sums[rows][..., 0, :].scatter_add_(-1, idx, ones(shape, g.dtype))
            sums[rows][..., 1, :].scatter_add_(-1, idx, v)
            torch.linalg.vector_norm(v, dim=-1, out=quad[rows])
        else:
            hv = torch.mul(v, h_b, out=scratch("search_hv", shape, g.dtype))
            sums[rows][..., 0, :].scatter_add_(-1, idx, h_b.expand(shape))
            sums[rows][..., 1, :].scatter_add_(-1, idx, hv)
            torch.sum(hv.mul_(v), -1, out=quad[rows])
    if h is None:
        quad.square_()
    flat = sums.reshape(-1, 4 * cells)
    quad = quad.reshape(-1)
    # Per group, (Σh, Σhv') per side over the keys of buckets up to each threshold:
    # one matrix product, whose last column is the side's total.
    prefix = _key_prefix_map(tuple(clips)).to(flat.dtype)
    upto = (flat.reshape(-1, 2 * cells) @ prefix).reshape(-1, 2, 2, n + 1)
    total = upto[..., n]  # [groups, (Σh, Σhv'), (below, above)]
    c = total[:, 0].sum(-1)
    sv = total[:, 1].sum(-1)
    # Σh·v², v = v' − cells, in units of r²·k²; Σhg and Σhg² from the same sums.
    quad_v = quad - (2 * cells) * sv + (cells * cells) * c
    err_all = torch.addmm(
        quad_v[None] / (k * k), _key_error_map(tuple(clips)).to(flat.dtype), flat.T
    )
    best = _first_argmin(err_all)
    factor = groups.new_tensor(clips)[best]
    err_best = err_all.gather(0, best[None]).reshape(-1) if need_error else torch.zeros_like(c)
    # The first refinement step: codes 1, 0 inside and outside the chosen threshold
    # below the middle, 2, 3 above it, so their sums are sums over keys.
    t = torch.tensor([sorted(clips).index(x) for x in clips])[best]
    part = upto.gather(-1, t[:, None, None, None].expand(-1, 2, 2, 1)).squeeze(-1)
    n1, n2 = part[:, 0].unbind(-1)
    n3 = total[:, 0, 1] - n2
    # Σh·v over each code's weights: Σh·v' less cells·Σh.
    v1, v2 = (part[:, 1] - cells * part[:, 0]).unbind(-1)
    v3 = total[:, 1, 1] - cells * total[:, 0, 1] - v2
    mid_f, r_k = mid.reshape(-1), r.reshape(-1) / k
    a = n1 + 4 * n2 + 9 * n3
    b = n1 + 2 * n2 + 3 * n3
    d = mid_f * b + r_k * (v1 + 2 * v2 + 3 * v3)
    sum_v = sv - cells * c
    e = mid_f * c + r_k * sum_v
    g2 = mid_f * mid_f * c + 2 * mid_f * r_k * sum_v + r_k * r_k * quad_v
    rc = r.reshape(-1) * factor
    s, lo = _solve(a, b, d, c, e, (rc * (2 / 3)).clamp_min_(1e-12), mid_f - rc)
    return factor, err_best, s, lo, c, e, g2


@functools.cache
def _key_layout(clips: tuple[float, ...]) -> tuple[int, float, int]:
    """(factors n, scale k, offset off): x ≥ 2c_j/3 for the j-th smallest factor exactly
    when ⌊k·x⌋ + off > j, with k = 1.5 / spacing and off = 1 − c_min / spacing."""
    asc = sorted(clips)
    n = len(asc)
    step = asc[1] - asc[0] if n > 1 else asc[0]
    off = 1 - asc[0] / step
    if (
        any(abs(b - a - step) > 1e-9 for a, b in itertools.pairwise(asc))
        or abs(off - round(off)) > 1e-6
    ):
        raise ValueError(
            f"clip factors {clips} are not evenly spaced on a grid through 0 (a multiple "
            "of their spacing apart from it)"
        )
    return n, 1.5 / step, round(off)


@functools.cache
def _key_buckets(clips: tuple[float, ...]) -> torch.Tensor:
    """[side, key within side]: the bucket (thresholds at or below x) of every key."""
    n, _, off = _key_layout(clips)
    cell = torch.arange(n - off + 1, dtype=torch.float32)
    # Below the middle the keys count down from the outermost cell.
    return torch.stack([cell.flip(0), cell]).add_(off).clamp_(0, n)


@functools.cache
def _key_prefix_map(clips: tuple[float, ...]) -> torch.Tensor:
    """[2·cells, 2·(n + 1)]: column (side, t) sums the keys of that side in buckets ≤ t."""
    n, _, off = _key_layout(clips)
    cells = n - off + 1
    bucket = _key_buckets(clips)  # [side, cell]
    m = torch.zeros(2, cells, 2, n + 1)
    for side in range(2):
        m[side, :, side] = (bucket[side][:, None] <= torch.arange(n + 1)).float()
    return m.reshape(2 * cells, 2 * (n + 1))


@functools.cache
def _key_error_map(clips: tuple[float, ...]) -> torch.Tensor:
    """[n, 4·cells]: factor j's error in units of r²·k² … r² from the per-key sums of h
    and of h·v' (see `_search_chunk`): the bucket error map spread over the keys."""
    n, k, off = _key_layout(clips)
    cells = n - off + 1
    per_bucket = _error_map(clips).reshape(2, n + 1, n)
    bucket = _key_buckets(clips).long()  # [side, cell]
    on_n, on_x = per_bucket[0][bucket], per_bucket[1][bucket]  # [side, cell, factor]
    # Σh·x = side·(Σh·v' − cells·Σh)/k, with side −1 below the middle and +1 above.
    side = torch.tensor([-1.0, 1.0])[:, None, None]
    m_n = on_n - side * (cells / k) * on_x
    m_v = side / k * on_x
    return torch.stack([m_n, m_v]).reshape(4 * cells, n).T.contiguous()


def _first_argmin(err: torch.Tensor) -> torch.Tensor:
    """Per column of err [n ≤ 32, M], the row of its least value, the first of values
    equal to 2⁻¹⁸ relative. The row goes into the low bits of each value's float32 bits
    (ordered as integers for values ≥ 0), so one vectorised minimum finds both."""
    bits = err.clamp_min(0).view(torch.int32).bitwise_and_(~31)
    rows = torch.arange(err.shape[0], dtype=torch.int32)[:, None]
    return bits.bitwise_or_(rows).amin(0).bitwise_and_(31).long()


@functools.cache
def _error_map(clips: tuple[float, ...]) -> torch.Tensor:
    """[2·(n + 1), n]: factor j's error from the per-bucket sums of h and of h·x (bucket
    b holds the weights at or above b of the ascending thresholds 2c/3)."""
    asc = sorted(clips)
    n = len(asc)
    m = torch.zeros(2, n + 1, n, dtype=torch.float64)
    for j, c in enumerate(clips):
        above = torch.arange(n + 1) > asc.index(c)
        m[0, :, j] = torch.where(above, c * c, c * c / 9)
        m[1, :, j] = torch.where(above, -2 * c, -2 * c / 3)
    return m.reshape(2 * (n + 1), n).float()


def choose_grids(
    fit: torch.Tensor, h: torch.Tensor | None, k4: int, clips: tuple[float, ...], refine: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows of groups [rows, G, group_size]: which groups are 4-bit (the k4 per row
    where 4 bits remove the most error) and every group's (s, lo) at its width.
    Raises ValueError if a weight is NaN or infinite."""
    rows, n_groups, group_size = fit.shape
    extremes = _extremes(fit)
    # NaN and infinities reach the groups' extremes: checked there, not in a pass of its own.
    if not all(bool(torch.isfinite(t).all()) for t in extremes):
        raise ValueError("the weight has NaN or Inf entries")
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
    f4 = fit.reshape(-1, group_size).index_select(0, is4.reshape(-1).nonzero().squeeze(1))
    h4 = None if h is None else h.expand_as(fit)[is4]
    ext4 = (extremes[0][is4], extremes[1][is4])
    s4, lo4 = _grid(f4, h4, 4, CLIP4 if clips == CLIP_GRID else clips, ext4)
    if refine:
        totals4 = tuple(t.reshape(is4.shape)[is4] for t in totals)
        s4, lo4, _ = _refine_with_error(f4, h4, s4, lo4, 4, REFINE_STEPS_4, totals4)
    s[is4], lo[is4] = s4, lo4
    return is4, s, lo
