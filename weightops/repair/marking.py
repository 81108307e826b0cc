"""Antidote's marking rule: in every output row of a weight matrix, the top share of
the entries by score |W − W_ref| · ‖X‖₂ (weightops.repair.prune describes the method)."""

from __future__ import annotations

import math

import torch

from weightops.repair.data import RepairError

# Scores are computed in float64 blocks of about this many entries.
_BLOCK = 1 << 20


def top_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k highest scores of every row; among entries equal to a
    row's k-th highest score, the lowest column indices are taken first."""
    cols = scores.shape[1]
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.topk(scores, k, dim=1, sorted=True).values[:, -1:]
    above = scores > threshold
    tied = scores == threshold
    room = k - above.sum(1, keepdim=True)
    return above | (tied & (tied.cumsum(1) <= room))


def per_row(ratio: float, cols: int) -> int:
    """Entries marked per row: ⌊ratio · cols⌋ (the 1e-9 absorbs 0.3 · 10 = 2.9999…)."""
    return math.floor(ratio * cols + 1e-9)


def mark(
    weight: torch.Tensor,
    norms: torch.Tensor | None,
    ratio: float,
    *,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """The harmful mask of a (out, in) matrix: top `ratio` per row of
    |weight − reference| · norms (reference and norms optional)."""
    rows, cols = weight.shape
    k = per_row(ratio, cols)
    out = torch.zeros(weight.shape, dtype=torch.bool)
    if k == 0:
        return out
    step = max(1, _BLOCK // max(cols, 1))
    for r0 in range(0, rows, step):
        w = weight[r0 : r0 + step].double()
        if reference is not None:
            w = w - reference[r0 : r0 + step].double()
        s = w.abs_()
        if norms is not None:
            s.mul_(norms.double())
        if not torch.isfinite(s).all():
            raise RepairError("a weight or activation norm is not finite (NaN or Inf)")
        out[r0 : r0 + step] = top_per_row(s, k)
    return out
