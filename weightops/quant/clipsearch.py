"""The 2-bit clip search of the mixed 2/4-bit quantizer, and the first refinement step
from the same sums (the grids and the rest of the refinement are weightops.quant.grids).

In the terms of weightops.quant.grids (a group's middle m and half-range r, a weight's
x = |g − m| / r, the clip factor c), a weight rounds at 2 bits to the level c/3 or c
from the middle, whichever is nearer: c when x ≥ 2c/3. Sorting every weight into the
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
"""

from __future__ import annotations

import functools
import itertools

import torch

from weightops.quant import native
from weightops.quant.blocks import ones, row_blocks, scratch

# Rows of the clip search's per-key sums held at once, in weight values (their sums take
# 12 MB); fewer, larger chunks spend less on the few dozen operations per chunk: on
# SmolLM2-135M, 1 << 22 took 0.95 of the time of 1 << 20.
CHUNK_VALUES = 1 << 22


def importance_rows(
    h: torch.Tensor | None, groups: torch.Tensor, rows: slice
) -> torch.Tensor | None:
    """The importance of a row block: h holds one row per group row, or broadcasts."""
    return h[rows] if h is not None and h.shape == groups.shape else h


def group_extremes(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = groups.new_empty(groups.shape[:-1]), groups.new_empty(groups.shape[:-1])
    if native.ready(groups):
        native.run("wo_extremes", lo.numel(), groups, lo, hi, groups.shape[-1])
        return lo, hi
    for rows in row_blocks(groups):
        torch.amin(groups[rows], -1, out=lo[rows])
        torch.amax(groups[rows], -1, out=hi[rows])
    return lo, hi


def solve_line(
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


def search_2bit(
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
    lo0, hi0 = extremes or group_extremes(groups)
    lead = groups.shape[:-1]
    out = groups.new_zeros(7, *lead)
    n, k, off = _key_layout(clips)
    if h is None and _native_search(clips) and native.ready(groups):
        # All of it in one fused pass per group (native.c), split over the threads.
        lo0, hi0 = lo0.contiguous(), hi0.contiguous()
        native.run(
            "wo_search_2bit", lo0.numel(), groups, lo0, hi0, *_native_maps(tuple(clips)),
            groups.new_tensor(clips), n, k, float(n - off + 1), 2 * (n - off + 1),
            int(need_error), *out, groups.shape[-1],
        )  # fmt: skip
        return tuple(out.unbind(0))
    # The key sums take 0.7 values per weight: made and used a chunk of rows at a time.
    for rows in row_blocks(groups, CHUNK_VALUES):
        h_rows = importance_rows(h, groups, rows)
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
    # A group without range, or one so narrow (denormal) that k/r overflows, has every
    # weight at the middle: an infinite scale would make (g − m)·k/r NaN there.
    scale = k / r
    scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(r))
    lead = groups.shape[:-1]
    # Per group and key: Σh and Σh·v', where v' = (g − m)·k/r + cells, and Σh·v'².
    quad = groups.new_empty(lead)
    sums = _torch_sums(groups, h, mid, scale, cells, quad)
    flat = sums.reshape(-1, 4 * cells)
    # One matrix product gives, per group, each factor's error less its quadratic term,
    # Σh and Σhv' over all keys, and for each factor the sums Σhq², Σhq and Σhq·v of the
    # codes it gives (_key_map).
    out = flat @ _key_map(tuple(clips)).to(flat.dtype)
    c, sv = out[:, n], out[:, n + 1]
    # Σh·v², v = v' − cells, in units of r²·k²; Σhg and Σhg² from the same sums.
    quad_v = quad.reshape(-1) - (2 * cells) * sv + (cells * cells) * c
    err_all = torch.add(out[:, :n], (quad_v / (k * k))[:, None])
    best = _first_argmin(err_all.T)
    factor = groups.new_tensor(clips)[best]
    err_best = err_all.gather(1, best[:, None]).reshape(-1) if need_error else torch.zeros_like(c)
    # The first refinement step on the chosen grid, from its codes' sums.
    chosen = out[:, n + 2 :].view(-1, 3, n).gather(2, best[:, None, None].expand(-1, 3, 1))
    a, b, qv = chosen.squeeze(2).unbind(1)
    mid_f, r_k = mid.reshape(-1), r.reshape(-1) / k
    d = mid_f * b + r_k * qv
    sum_v = sv - cells * c
    e = mid_f * c + r_k * sum_v
    g2 = mid_f * mid_f * c + 2 * mid_f * r_k * sum_v + r_k * r_k * quad_v
    rc = r.reshape(-1) * factor
    s, lo = solve_line(a, b, d, c, e, (rc * (2 / 3)).clamp_min_(1e-12), mid_f - rc)
    return factor, err_best, s, lo, c, e, g2


def _torch_sums(
    groups: torch.Tensor,
    h: torch.Tensor | None,
    mid: torch.Tensor,
    scale: torch.Tensor,
    cells: int,
    quad: torch.Tensor,
) -> torch.Tensor:
    """`_search_chunk`'s per-key sums [*lead, 2, 2·cells] in torch, row block by row
    block; Σh·v'² into quad."""
    sums = scratch("search_sums", (*groups.shape[:-1], 2, 2 * cells), groups.dtype).zero_()
    for rows in row_blocks(groups):
        g = groups[rows]
        shape = tuple(g.shape)
        v = torch.sub(g, mid[rows][..., None], out=scratch("search_v", shape, g.dtype))
        # A Python int would be converted to a tensor for each block; a float is not.
        v.mul_(scale[rows][..., None]).add_(float(cells))
        # The thresholds 2c/3 of x = |g − m|/r fall on integers of |v' − cells| (below
        # the middle, on the cell edges counted from the other end): the key is the
        # cell, the weights beyond the last threshold sharing the outermost ones. A
        # weight on a threshold is as far from both levels, so either side of it gives
        # it the same error. Clamped to [0, 2·cells − 1] first, the conversion to an
        # integer (which truncates) is the floor.
        key = torch.clamp(v, 0, 2 * cells - 1, out=scratch("search_key", shape, g.dtype))
        idx = scratch("search_idx", shape, torch.int64).copy_(key)
        h_b = importance_rows(h, groups, rows)
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
    return sums


def _native_search(clips: tuple[float, ...]) -> bool:
    """Whether native.c's search has room for these factors and their keys."""
    n, _, off = _key_layout(clips)
    return 2 * (n - off + 1) <= native.MAX_KEYS and n <= native.MAX_FACTORS


@functools.cache
def _native_maps(clips: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """_key_map as wo_search_2bit reads it: the error columns [keys, MAX_FACTORS], and
    every column as a row [4n + 2, keys rounded up to MAX_FACTORS], zero-padded."""
    m = _key_map(clips)
    n, lanes = len(clips), native.MAX_FACTORS
    width = -(-m.shape[0] // lanes) * lanes
    map_err = torch.zeros(m.shape[0], lanes)
    map_err[:, :n] = m[:, :n]
    map_t = torch.zeros(m.shape[1], width)
    map_t[:, : m.shape[0]] = m.T
    return map_err, map_t


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
def _key_map(clips: tuple[float, ...]) -> torch.Tensor:
    """[4·cells, 4n + 2]: from a group's per-key sums (Σh per key, then Σh·v' per key),
    the columns: each factor's error less its quadratic term (`_key_error_map`), Σh and
    Σh·v' over all keys, then per factor Σhq², Σhq and Σhq·v (v = v' − cells) of its
    codes: 1 or 0 below the middle, inside or outside its threshold, 2 or 3 above."""
    n, _, off = _key_layout(clips)
    keys = 2 * (n - off + 1)
    m = torch.zeros(2, keys, 4 * n + 2)
    m[:, :, :n] = _key_error_map(clips).T.reshape(2, keys, n)
    m[0, :, n] = m[1, :, n + 1] = 1
    bucket = _key_buckets(clips).reshape(-1)  # [key]
    asc = sorted(clips)
    for j, c in enumerate(clips):
        inside = (bucket <= asc.index(c)).float()
        code = torch.cat([inside[: keys // 2], 3 - inside[keys // 2 :]])
        m[0, :, n + 2 + j] = code * code
        m[0, :, 2 * n + 2 + j] = code
        m[0, :, 3 * n + 2 + j] = -(keys // 2) * code
        m[1, :, 3 * n + 2 + j] = code
    return m.reshape(2 * keys, 4 * n + 2)


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
