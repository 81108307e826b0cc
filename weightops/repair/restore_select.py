"""Choosing the k weights with the largest scores for alignment restoration, ties at the
k-th score drawn from a seeded generator, without holding every score of the pool.

The pool has tens of millions of weights and a step restores a few thousandths of them,
so the candidates of each tensor go through a `Shortlist`, which keeps only those that
can still be among the k largest. The draw sees exactly the entries the full list
would show it (every one tied at the k-th value, in index order), so the choice is
the same as `top` over all the scores at once.
"""

from __future__ import annotations

import torch


def top(scores: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of the k largest scores (k ≤ number of positive scores); ties at the k-th
    value are drawn at random from `gen`, so a run is reproducible from its seed."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    kth = torch.topk(scores, k, sorted=True).values[-1]
    above = (scores > kth).nonzero(as_tuple=True)[0]
    tied = (scores == kth).nonzero(as_tuple=True)[0]
    need = k - len(above)
    pick = tied[torch.randperm(len(tied), generator=gen)[:need]]
    return torch.cat([above, pick.to(above.device)])


def split(chosen: torch.Tensor, names: list[str], sizes: list[int]) -> dict[str, torch.Tensor]:
    """Indices into the concatenation of parts of `sizes` elements, split back into
    sorted indices within each part (parts with none left out)."""
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    chosen = chosen.sort().values
    out = {}
    for i, n in enumerate(names):
        local = chosen[(chosen >= bounds[i]) & (chosen < bounds[i + 1])] - bounds[i]
        if len(local):
            out[n] = local
    return out


class Shortlist:
    """The candidates (positive scores, global indices, added in any order) that may be
    among the k largest of all those added: every one at or above the k-th largest
    score seen so far. An entry dropped is below that, so below the final k-th value
    as well."""

    def __init__(self, k: int):
        self.k = k
        self.count = 0
        self.scores: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []
        self.held = 0

    def add(self, scores: torch.Tensor, index: torch.Tensor) -> None:
        self.count += len(scores)
        if self.k <= 0 or not len(scores):
            return
        self.scores.append(scores)
        self.index.append(index)
        self.held += len(scores)
        # Trimming at 2k keeps the cost of the trims linear in what is added.
        if self.held > 2 * self.k:
            s, i = torch.cat(self.scores), torch.cat(self.index)
            kth = torch.topk(s, self.k, sorted=True).values[-1]
            keep = s >= kth
            self.scores, self.index = [s[keep]], [i[keep]]
            self.held = int(keep.sum())

    def top(self, gen: torch.Generator) -> torch.Tensor:
        """Global indices of the min(k, candidates) largest, as `top` over every score."""
        take = min(self.k, self.count)
        if take <= 0:
            return torch.empty(0, dtype=torch.long)
        s, i = torch.cat(self.scores), torch.cat(self.index)
        # In index order, as the full list would show the ties to the draw.
        order = torch.argsort(i)
        s, i = s[order], i[order]
        return i[top(s, take, gen)]
