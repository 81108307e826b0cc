"""Sparsification and sign consensus shared by the task-arithmetic family.

Every function takes a task vector (delta = fine-tune - base) and returns a same-shape
tensor; none of them keeps state, so they are safe to call from any worker.
"""

from __future__ import annotations

import torch


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly max(1, ⌊density·n⌋) entries of largest magnitude, zero the rest.

    The threshold comes from a selection (O(n)) instead of a full sort; entries equal
    to the threshold are kept in index order until the count is exact, so the result
    is deterministic and has exactly the requested density.
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    k = max(1, int(density * n))
    mag = delta.abs().reshape(-1)
    threshold = torch.kthvalue(mag, n - k + 1).values
    keep = mag > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        ties = torch.nonzero(mag == threshold).squeeze(1)[:missing]
        keep[ties] = True
    return delta * keep.reshape(delta.shape)


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
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[order[bottom_n : bottom_n + keep_n]] = True
    return delta * keep.reshape(delta.shape)


def random_drop(delta: torch.Tensor, density: float, rng: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (Bernoulli, from `rng`)."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=rng, device=delta.device) < density
    return delta * keep


def rescale_l1(original: torch.Tensor, pruned: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `pruned` so its L1 norm matches `original`'s (no-op for near-zero norms)."""
    before = original.abs().sum()
    after = pruned.abs().sum()
    if before < eps or after < eps:
        return pruned
    return pruned * (before / after)


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election: per entry, the sign of the summed weighted deltas wins
    (ties go to +); returns a bool mask [models, ...] of the deltas that agree."""
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    return weighted.sign() == majority


def combine(
    deltas: list[torch.Tensor],
    base: torch.Tensor,
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """base + λ · Σ wᵢ·δᵢ (masked by sign consensus), optionally divided by Σ wᵢ
    over the deltas that contributed to each entry."""
    if not consensus:
        mixed = torch.zeros_like(base)
        for delta, weight in zip(deltas, weights):
            mixed.add_(delta, alpha=weight)
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            mixed /= total
    else:
        w = torch.tensor(weights, dtype=base.dtype, device=base.device)
        w = w.reshape(-1, *([1] * base.dim()))
        weighted = torch.stack(deltas).mul_(w)
        mask = sign_consensus(weighted)
        mixed = weighted.mul_(mask).sum(dim=0)
        del weighted
        if normalize:
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
            mixed /= divisor
    if lam != 1:
        mixed *= lam
    return mixed.add_(base)
