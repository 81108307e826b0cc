"""Magnitude trims of task vectors applied to row blocks, from exact whole-tensor cuts.

TIES and Model Breadcrumbs rank all n entries of a task vector δ by |δ|, ties in index
order, and keep a range of ranks. Written for a whole tensor that needs the tensor
whole; written here, a block of rows needs only the values at the rank boundaries,
which the engine finds beforehand with an exact streaming selection (see
weightops.engine.select): a method that declares `cuts=` in `@merge_method` gets a
`Cut` per boundary and per model for each row block, and the same entries survive as
in the whole-tensor functions of weightops.merge.sparsify, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Cut:
    """The entry at ascending position `position` of a task vector's magnitudes (ties
    in index order), seen from one row block.

    value: that entry's magnitude; less / equal: how many entries of the whole tensor
    are below / equal to it; before: how many entries equal to it lie in earlier rows.
    """

    position: int
    value: float
    less: int
    equal: int
    before: int

    def below(self, mag: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the block's entries whose rank is below `position`."""
        tied = mag == self.value
        # Index of each tied entry among all of the tensor's tied entries.
        order = torch.cumsum(tied.view(-1), 0).view(mag.shape) + (self.before - 1)
        return (mag < self.value) | (tied & (order < self.position - self.less))


def top_k_cut(delta: torch.Tensor, cut: Cut | None) -> torch.Tensor:
    """`sparsify.top_k` on a row block: keep the entries of descending rank < k (ties
    in index order), where `cut` is at ascending position n − k; in place."""
    # A cut at 0 keeps every nonzero entry, and zeroing a zero changes nothing.
    if cut is None or cut.value == 0:
        return delta
    flat = delta.view(-1)
    mag = flat.abs()
    # Of the `equal` entries tied at the threshold, the first equal − (n − k − less)
    # in index order are kept.
    keep = cut.equal - (cut.position - cut.less) - cut.before
    ties = torch.nonzero(mag == cut.value).squeeze(1)[: max(0, keep)] if keep > 0 else None
    threshold = torch.tensor(cut.value, dtype=mag.dtype, device=mag.device)
    torch.nn.functional.threshold(mag, cut.value, 0.0, inplace=True)
    torch.copysign(mag, flat, out=flat)
    if ties is not None and ties.numel():
        flat[ties] = torch.copysign(threshold.expand(ties.numel()), flat[ties])
    return delta


def rank_range_cut(delta: torch.Tensor, lower: Cut | None, upper: Cut | None) -> torch.Tensor:
    """`sparsify.magnitude_outliers` on a row block: zero the entries whose ascending
    rank is below `lower`'s position or not below `upper`'s; in place."""
    mag = delta.abs()
    drop = torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    if lower is not None:
        drop |= lower.below(mag)
    if upper is not None:
        drop |= ~upper.below(mag)
    return delta.masked_fill_(drop, 0)
