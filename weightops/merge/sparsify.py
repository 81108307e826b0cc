"""Sparsification and sign consensus shared by the task-arithmetic family.

Every function takes a task vector (delta = fine-tune − base) and returns a same-shape
tensor, overwriting its input to keep memory at one copy per model: the engine hands
methods private copies, and callers that still need a delta pass a clone.
"""

from __future__ import annotations

import torch


def kth_largest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """The k-th largest entry of a flat tensor, exactly, and how many entries are
    greater than it and equal to it.

    A full selection (kthvalue) runs on one core and is slow on large tensors; instead
    the answer is bracketed by quantiles of a small sample, entries above the bracket
    are counted, and only the entries inside it (a few percent) are selected from.
    The sample decides only the speed: when it misses, the full selection runs.
    """
    n = values.numel()
    if n > 1 << 17:
        g = torch.Generator(device=values.device).manual_seed(n)
        sample = values[torch.randint(n, (1 << 15,), generator=g, device=values.device)]
        q = 1 - k / n
        bounds = torch.tensor([max(0.0, q - 0.01), min(1.0, q + 0.01)], device=values.device)
        lo, hi = torch.quantile(sample, bounds)
        above = int(torch.count_nonzero(values > hi))
        band = values[(values >= lo) & (values <= hi)]
        rank = k - above  # rank of the answer inside the band, counted from the top
        if 1 <= rank <= band.numel():
            kth = torch.kthvalue(band, band.numel() - rank + 1).values
            greater = above + int(torch.count_nonzero(band > kth))
            return kth, greater, int(torch.count_nonzero(band == kth))
    kth = torch.kthvalue(values, n - k + 1).values
    return kth, int(torch.count_nonzero(values > kth)), int(torch.count_nonzero(values == kth))


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly max(1, ⌊density·n⌋) entries of largest magnitude, zero the rest.

    Entries equal to the threshold are kept in index order until the count is exact, so
    the result is deterministic and has exactly the requested density. Works in place.
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    return top_k(delta, max(1, int(density * n)))


def top_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k entries of largest magnitude (1 ≤ k), zero the rest, in place; ties at
    the threshold are kept in index order until exactly k survive."""
    # Task vectors of bf16 fine-tunes are often mostly exact zeros; when no more than k
    # entries are nonzero, the threshold is 0 and keeping k entries changes nothing.
    if int(torch.count_nonzero(delta)) <= k:
        return delta
    flat = delta.view(-1)
    mag = flat.abs()
    threshold, greater, equal = kth_largest(mag, k)
    ties = (
        torch.nonzero(mag == threshold).squeeze(1)[: k - greater] if equal and k > greater else None
    )
    # Pure float kernels: masking through bool tensors is several times slower on CPU.
    torch.nn.functional.threshold(mag, threshold.item(), 0.0, inplace=True)
    torch.copysign(mag, flat, out=flat)
    if ties is not None:
        flat[ties] = torch.copysign(threshold.expand(ties.numel()), flat[ties])
    return delta


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top `gamma` share by magnitude (outliers), then the
    smallest, so that a `density` share survives. Ranks come from a stable sort."""
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    keep_n = int(density * n)
    top_n = int(gamma * n)
    bottom_n = max(0, n - keep_n - top_n)
    order = torch.argsort(delta.abs().reshape(-1), stable=True)
    flat = delta.view(-1)
    flat[order[:bottom_n]] = 0
    flat[order[bottom_n + keep_n :]] = 0
    return delta


def random_drop(delta: torch.Tensor, density: float, rng: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (Bernoulli, from `rng`)."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=rng, device=delta.device, dtype=delta.dtype)
    return delta.mul_(keep.lt_(density))


def magnitude_sample(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rng: torch.Generator | None,
    *,
    rescale: bool,
) -> torch.Tensor:
    """DELLA's MagPrune: within each row, rank the entries by |δ| (ties in index order)
    and keep the entry of rank r (0 = smallest, of m) with probability
    pᵣ = density − epsilon + 2·epsilon·r/(m − 1), a single-entry row with p = density;
    with `rescale` the kept entries are divided by their pᵣ. A row is the whole tensor
    when it has one dimension, else everything after the first dimension. Needs
    0 ≤ density − epsilon and density + epsilon ≤ 1. In place.
    """
    if density >= 1 or delta.numel() == 0:
        return delta
    rows = delta.view(1, -1) if delta.dim() < 2 else delta.view(delta.shape[0], -1)
    m = rows.shape[1]
    ranks = torch.arange(m, device=delta.device, dtype=delta.dtype)
    levels = (density - epsilon + 2 * epsilon * ranks / max(m - 1, 1)).clamp_(0, 1)
    if m == 1:
        levels.fill_(density)
    # Ranking sorts each row and holds int64 indices: go through the rows in blocks so
    # the temporaries stay small; the draws depend only on the generator's state.
    step = max(1, BLOCK // m)
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        order = torch.argsort(block.abs(), dim=1, stable=True)
        keep_p = torch.empty_like(block).scatter_(1, order, levels.expand_as(block))
        draw = torch.rand(block.shape, generator=rng, device=block.device, dtype=block.dtype)
        keep = draw < keep_p
        block.mul_(keep)
        if rescale:
            # Dropped entries are already 0; dividing them by 1 avoids 0/0 where p = 0.
            block.div_(keep_p.masked_fill_(~keep, 1.0))
    return delta


def rescale_l1(l1_before: torch.Tensor, pruned: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `pruned` in place so its L1 norm is `l1_before` (no-op for near-zero norms)."""
    after = pruned.abs().sum()
    if l1_before < eps or after < eps:
        return pruned
    return pruned.mul_(l1_before / after)


def task_vectors(tensors: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """δᵢ = θᵢ − θ_base, in place; empties `tensors` so that each delta has a single
    owner and `combine` can free it as soon as it has been summed."""
    deltas = []
    while tensors:
        deltas.append(tensors.pop(0).sub_(base))
    return deltas


# combine() works through the tensors in blocks of this many entries, so its
# temporaries stay small and in cache whatever the size of the tensor.
BLOCK = 1 << 20


def combine(
    deltas: list[torch.Tensor],
    base: torch.Tensor,
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    elect_weights: list[float] | None = None,
) -> torch.Tensor:
    """base + λ · Σ wᵢ·δᵢ (masked by sign consensus), optionally divided by Σ wᵢ
    over the deltas that contributed to each entry. The consensus sign is that of
    Σ vᵢ·δᵢ with vᵢ = `elect_weights` (default the wᵢ). Writes the result into `base`
    (returned) and overwrites the deltas."""
    flats = [d.reshape(-1) for d in deltas]
    out = base.view(-1)
    total = sum(weights)
    for start in range(0, out.numel(), BLOCK):
        block = [f[start : start + BLOCK] for f in flats]
        if consensus:
            mixed = _elect(block, weights, elect_weights or weights, normalize)
        else:
            mixed = torch.zeros_like(block[0])
            for delta, weight in zip(block, weights, strict=True):
                mixed.add_(delta, alpha=weight)
            if normalize and abs(total) >= 1e-8:
                mixed /= total
        if lam != 1:
            mixed.mul_(lam)
        out[start : start + BLOCK].add_(mixed)
    return base


def _elect(
    block: list[torch.Tensor], weights: list[float], votes: list[float], normalize: bool
) -> torch.Tensor:
    """TIES election without stacking the deltas. With uᵢ = wᵢδᵢ and e = ±1 the elected
    sign (that of Σ vᵢδᵢ, 0 counting as +), the agreeing part of uᵢ is e·relu(e·uᵢ), and
    it agrees where e·uᵢ > 0 (zeros never agree). Overwrites the deltas."""
    elected = torch.zeros_like(block[0])
    for delta, vote in zip(block, votes, strict=True):
        elected.add_(delta, alpha=vote)
    elected.sign_().add_(0.5).sign_()  # -1 -> -1, 0 -> +1, +1 -> +1
    mixed = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected) if normalize else None
    for delta, weight in zip(block, weights, strict=True):
        agreeing = delta.mul_(elected).mul_(weight).relu_()
        mixed.add_(agreeing)
        if divisor is not None:
            divisor.add_(agreeing.sign_(), alpha=weight)
    mixed.mul_(elected)
    if divisor is not None:
        mixed /= divisor.masked_fill_(divisor == 0, 1.0)
    return mixed
