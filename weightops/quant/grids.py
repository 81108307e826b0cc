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
product for all factors together, instead of one rounding pass per factor. That makes
a finer and wider 2-bit search (21 factors, 1.0 down to 0.5) cheaper than the old one
(7 factors, 1.0 down to 0.7), and after it two refinement steps reach a lower error
than four did after the old search (bench/bench_quant_speed.py measures both).

The refinement's last least-squares step already holds the sums that give each group's
error for its codes on the new grid, so the 2-bit error needs no further pass. A group's
gain from 4 bits is that error less the 4-bit rounding noise of its range (s²/12 per
weight, s = 2r/15): 4 bits leave a few percent of the 2-bit error, and estimating them
saves computing 4-bit grids for the groups that stay 2-bit. Only the k4 chosen groups
per row then get a 4-bit clip search (three factors; the refinement does most of the
work at 4 bits) and four refinement steps.
"""

from __future__ import annotations

import functools
import itertools

import torch

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
REFINE_STEPS = 4
# The factors of the 2-bit and the 4-bit search, and the 2-bit refinement steps (module doc).
CLIP2 = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))
REFINE_STEPS_2 = 2
CLIP4 = (1.0, 0.9, 0.8)


def _sq_error(
    groups: torch.Tensor, h: torch.Tensor | None, s: torch.Tensor, lo: torch.Tensor, levels: int
) -> torch.Tensor:
    """Weighted squared error per group of rounding to the grid (s, lo); s and lo may carry
    leading dimensions (one grid per clip factor) that broadcast against the groups."""
    x = groups - lo[..., None]
    x.div_(s[..., None]).round_().clamp_(0, levels)
    x.mul_(s[..., None]).add_(lo[..., None]).sub_(groups).square_()
    if h is not None:
        x.mul_(h)
    return x.sum(-1)


def _grid(
    groups: torch.Tensor, h: torch.Tensor | None, bits: int, clips: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, low) from the clip factor with the least weighted error (h None:
    every input counts the same), each factor's error measured by rounding; ties go to the
    earlier factor."""
    levels = 2**bits - 1
    lo0, hi0 = groups.amin(-1), groups.amax(-1)
    mid = (lo0 + hi0) / 2
    # All factors at once: one grid per factor along a leading dimension.
    c = torch.tensor(clips, dtype=groups.dtype).reshape(-1, *[1] * lo0.dim())
    lo = mid - (mid - lo0) * c
    hi = mid + (hi0 - mid) * c
    s = ((hi - lo) / levels).clamp_min(1e-12)
    err = _sq_error(groups, h, s, lo, levels)
    best_err, best_s, best_lo = err[0], s[0], lo[0]
    for i in range(1, len(clips)):
        better = err[i] < best_err
        best_err = torch.where(better, err[i], best_err)
        best_s = torch.where(better, s[i], best_s)
        best_lo = torch.where(better, lo[i], best_lo)
    return best_s, best_lo


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_refine`, and each group's error for the last codes on the final grid: an upper
    bound of its error after rounding to that grid again, from the sums the last step
    already has (no pass over the weights)."""
    levels = 2**bits - 1
    if h is None:
        c = torch.full_like(s, groups.shape[-1])
        e = groups.sum(-1)
        g2 = (groups * groups).sum(-1)
    else:
        h = h.expand_as(groups)
        hg = h * groups
        c, e, g2 = h.sum(-1), hg.sum(-1), (hg * groups).sum(-1)
    a = b = d = None
    for _ in range(steps):
        inv = 1 / s
        q = groups * inv[..., None]
        q.sub_((lo * inv)[..., None]).round_().clamp_(0, levels)
        hq = q if h is None else h * q
        a, b, d = (hq * q).sum(-1), hq.sum(-1), (hq * groups).sum(-1)
        det = a * c - b * b
        s_new = (c * d - b * e) / det.clamp_min(1e-30)
        lo_new = (e - b * s_new) / c.clamp_min(1e-30)
        # A group whose codes are all equal (or whose weights all count zero) has no
        # unique line; a non-positive slope would flip the grid. Both keep their grid.
        ok = (det > 1e-9 * (a * c).clamp_min(1e-30)) & (s_new > 1e-12)
        s = torch.where(ok, s_new, s)
        lo = torch.where(ok, lo_new, lo)
    if a is None:
        return s, lo, _sq_error(groups, h, s, lo, levels)
    # Σ h (q·s + lo − g)² expanded in the sums of the last step.
    err = s * s * a + 2 * s * lo * b + lo * lo * c - 2 * s * d - 2 * lo * e + g2
    return s, lo, err.clamp_min_(0)


def _scaled_offsets(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x = |g − m| / r per weight, m, r per group); x is 0 in a constant group."""
    lo0, hi0 = groups.amin(-1), groups.amax(-1)
    mid = (lo0 + hi0) * 0.5
    r = (hi0 - lo0) * 0.5
    inv = torch.where(r > 0, 1 / r, torch.zeros_like(r))
    x = (groups - mid[..., None]).abs_().mul_(inv[..., None])
    return x, mid, r


def _clip_search_2bit(
    x: torch.Tensor, h: torch.Tensor | None, clips: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip factor, error / r²) per group at 2 bits, every factor's error from per-bucket
    sums (module docstring); ties go to the earlier factor of `clips`."""
    asc = sorted(clips)
    n = len(asc)
    if n > 1:
        step = asc[1] - asc[0]
        if any(abs(b - a - step) > 1e-9 for a, b in itertools.pairwise(asc)):
            raise ValueError(f"clip factors {clips} are not evenly spaced")
        # Bucket = how many thresholds 2c/3 lie at or below x (a weight exactly on one
        # is as far from both levels, so either bucket gives it the same error).
        idx = x.mul(1.5 / step).add_(1 - asc[0] / step).floor_().clamp_(0, n)
    else:
        idx = x.ge(2 * asc[0] / 3)
    idx = idx.long()
    hx = x if h is None else x * h
    weights = torch.ones(()).expand_as(x) if h is None else h.expand_as(x)
    sums = x.new_zeros(*x.shape[:-1], 2, n + 1)
    sums[..., 0, :].scatter_add_(-1, idx, weights)
    sums[..., 1, :].scatter_add_(-1, idx, hx)
    quad = (hx * x).sum(-1).reshape(-1, 1)
    # Below 2c/3 a weight rounds to c/3, at or above it to c (units of r): its error is
    # x² − 2x·c/3 + c²/9 or x² − 2x·c + c², so each factor's error is a fixed linear
    # combination of the bucket sums: all factors in one matrix product.
    err = torch.addmm(quad, sums.reshape(-1, 2 * (n + 1)), _error_map(tuple(clips)))
    best = err.argmin(-1)  # the first of equal minima: the earlier factor
    factor = torch.tensor(clips, dtype=x.dtype)[best]
    shape = x.shape[:-1]
    return factor.reshape(shape), err.gather(-1, best[:, None]).reshape(shape)


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
    where 4 bits remove the most error) and every group's (s, lo) at its width."""
    rows, n_groups, _ = fit.shape
    is4 = torch.zeros(rows, n_groups, dtype=torch.bool)
    if k4 == n_groups:
        s, lo = _grid(fit, h, 4, clips)
        s, lo = _refine(fit, h, s, lo, 4) if refine else (s, lo)
        return is4.fill_(True), s, lo
    x, mid, r = _scaled_offsets(fit)
    factor, err2 = _clip_search_2bit(x, h, CLIP2 if clips == CLIP_GRID else clips)
    rc = r * factor
    s, lo = (rc * (2 / 3)).clamp_min_(1e-12), mid - rc
    if refine:
        s, lo, err2 = _refine_with_error(fit, h, s, lo, 2, REFINE_STEPS_2)
    else:
        err2 = err2 * r * r
    if not k4:
        return is4, s, lo
    # 4 bits leave a small fraction of the 2-bit error; which groups gain most is decided
    # by the 2-bit error, less the 4-bit rounding noise of the group's range (s²/12 per
    # weight, s = 2r/15), so no pass is spent on 4-bit grids of groups that stay 2-bit.
    weight = fit.shape[-1] if h is None else h.sum(-1).expand_as(r)
    gain = err2.sub_((r * r).mul_(weight).mul_((2 / 15) ** 2 / 12))
    is4.scatter_(1, gain.topk(k4, dim=1).indices, True)
    f4 = fit[is4]
    h4 = None if h is None else h.expand_as(fit)[is4]
    s4, lo4 = _grid(f4, h4, 4, CLIP4 if clips == CLIP_GRID else clips)
    s4, lo4 = _refine(f4, h4, s4, lo4, 4) if refine else (s4, lo4)
    s[is4], lo[is4] = s4, lo4
    return is4, s, lo
