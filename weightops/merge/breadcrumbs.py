"""Model Breadcrumbs: drop both the smallest and the largest entries of task vectors."""

from __future__ import annotations

from typing import Annotated, Any

import torch

from weightops.merge import as_mergekit as mk
from weightops.merge.cuts import Cut, rank_range_cut
from weightops.merge.registry import PerModel, Range, Unit, merge_method, numerics_variant
from weightops.merge.sparsify import combine, magnitude_outliers, rescale_l1, task_vectors

Gamma = Annotated[float, Range(ge=0, lt=1)]

_DOC = """Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task
Model Merging with Sparse Masks", ECCV 2024){variant}.

Per task vector δᵢ = θᵢ − θ_base with n entries ranked by |δ| (stable sort): zero the
top ⌊gamma·n⌋ (outliers) and then the smallest, so that ⌊density·n⌋ entries remain
(fewer outliers are dropped when density + gamma > 1); then
    {formula}

Parameters:
  weight (per model, required): scale of each task vector.
  density (per model, default 1.0, 0 < density ≤ 1): share kept; the paper uses ~0.9.
  gamma (per model, default 0.01, 0 ≤ gamma < 1): share of largest entries dropped.
  lambda (default 1.0): global scale of the merged task vector.
  normalize (default false): divide by the summed weights{agree}.
  rescale (default false): scale each pruned task vector back to its original L1
    norm, as mergekit's `rescale` does.
  int8_mask: accepted so mergekit recipes run.
With density 1 the task vector is left whole (gamma is not applied), as in mergekit.
Deliberate difference from mergekit: ties in |δ| are ranked in index order (a stable
sort), so the masks depend only on the inputs; mergekit's unstable sort may keep other
tied entries; `--numerics mergekit` keeps mergekit's order (see
weightops.merge.as_mergekit), including its all-zero mask when ⌊gamma·n⌋ = 0.
Large tensors run in row blocks, with both rank cuts found beforehand by an exact
streaming selection (weightops.engine.select); with `rescale` a tensor runs whole.
"""


def _ranks(params: dict[str, Any], n: int) -> list[tuple[int | None, ...]] | None:
    """The kept ranks [bottom, bottom + keep) as two cuts, None where a side keeps
    everything. The L1 rescale needs whole-tensor sums in their own order: whole."""
    if params["rescale"]:
        return None
    positions: list[tuple[int | None, ...]] = []
    for d, g in zip(params["density"], params["gamma"], strict=True):
        if d >= 1:
            positions.append((None, None))
            continue
        keep, top = int(d * n), int(g * n)
        bottom = max(0, n - keep - top)
        positions.append((bottom or None, bottom + keep if bottom + keep < n else None))
    return positions


def _register(name: str, *, consensus: bool, doc: str) -> None:
    def breadcrumbs(
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        *,
        weight: PerModel[float],
        density: PerModel[Unit] = 1.0,
        gamma: PerModel[Gamma] = 0.01,
        lambda_: float = 1.0,
        normalize: bool = False,
        rescale: bool = False,
        int8_mask: bool = False,
        cuts: list[tuple[Cut | None, ...]] | None = None,
    ) -> torch.Tensor:
        deltas = task_vectors(tensors, base)
        if cuts is not None:
            # A row block of a large tensor, with the rank cuts found beforehand.
            deltas = [rank_range_cut(d, *c) for d, c in zip(deltas, cuts, strict=True)]
            return combine(
                deltas, base, weight, consensus=consensus, normalize=normalize, lam=lambda_
            )
        for i, (d, g) in enumerate(zip(density, gamma, strict=True)):
            l1 = deltas[i].abs().sum() if rescale else None
            deltas[i] = magnitude_outliers(deltas[i], d, g)
            if l1 is not None:
                deltas[i] = rescale_l1(l1, deltas[i])
        return combine(deltas, base, weight, consensus=consensus, normalize=normalize, lam=lambda_)

    def breadcrumbs_as_mergekit(
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        *,
        weight: list[float],
        density: list[float],
        gamma: list[float],
        lambda_: float = 1.0,
        normalize: bool = False,
        rescale: bool = False,
        int8_mask: bool = False,
    ) -> torch.Tensor:
        deltas = [
            mk.magnitude_outliers(d, p, g, rescale=rescale)
            for d, p, g in zip(mk.task_vectors(tensors, base), density, gamma, strict=True)
        ]
        return mk.combine(
            deltas,
            base,
            weight,
            consensus=consensus,
            normalize=normalize,
            lam=lambda_,
            int8_mask=int8_mask,
        )

    breadcrumbs.__name__ = breadcrumbs.__qualname__ = name
    breadcrumbs.__doc__ = doc
    merge_method(name, base="required", reference="https://arxiv.org/abs/2312.06795", ranks=_ranks)(
        breadcrumbs
    )
    numerics_variant(name, "mergekit")(breadcrumbs_as_mergekit)


_register(
    "breadcrumbs",
    consensus=False,
    doc=_DOC.format(variant="", formula="θ = θ_base + λ · Σᵢ wᵢ·δᵢ", agree=""),
)
_register(
    "breadcrumbs_ties",
    consensus=True,
    doc=_DOC.format(
        variant=", with TIES sign election (Yadav et al., NeurIPS 2023)",
        formula="θ = θ_base + λ · Σᵢ [sign(wᵢδᵢ) = s]·wᵢδᵢ,  s = sign(Σᵢ wᵢδᵢ)",
        agree=" of the models agreeing in sign",
    ),
)
