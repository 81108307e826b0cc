"""Model Breadcrumbs: drop both the smallest and the largest entries of task vectors."""

from __future__ import annotations

from typing import Annotated

import torch

from weightops.merge.registry import PerModel, Range, Unit, merge_method
from weightops.merge.sparsify import combine, magnitude_outliers, task_vectors

Gamma = Annotated[float, Range(ge=0, lt=1)]


def _breadcrumbs(tensors, base, weight, density, gamma, lam, normalize, consensus) -> torch.Tensor:
    deltas = task_vectors(tensors, base)
    for i, (d, g) in enumerate(zip(density, gamma, strict=True)):
        deltas[i] = magnitude_outliers(deltas[i], d, g)
    return combine(deltas, base, weight, consensus=consensus, normalize=normalize, lam=lam)


@merge_method("breadcrumbs", base="required", reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float],
    density: PerModel[Unit] = 1.0,
    gamma: PerModel[Gamma] = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task
    Model Merging with Sparse Masks", ECCV 2024).

    Per task vector δᵢ = θᵢ − θ_base with n entries ranked by |δ|: zero the top
    ⌊gamma·n⌋ (outliers) and then the smallest, so that ⌊density·n⌋ entries remain
    (fewer outliers are dropped when density + gamma > 1); then
    θ = θ_base + λ · Σᵢ wᵢ·δᵢ.

    Parameters:
      weight (per model, required): scale of each task vector.
      density (per model, default 1.0, 0 < density ≤ 1): share kept; the paper uses ~0.9.
      gamma (per model, default 0.01, 0 ≤ gamma < 1): share of largest entries dropped.
      lambda (default 1.0), normalize (default false): as in task arithmetic.
      int8_mask: accepted so mergekit recipes run.
    With density 1 the task vector is left whole (gamma is not applied), as in mergekit.
    """
    return _breadcrumbs(tensors, base, weight, density, gamma, lambda_, normalize, False)


@merge_method("breadcrumbs_ties", base="required", reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs_ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float],
    density: PerModel[Unit] = 1.0,
    gamma: PerModel[Gamma] = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Model Breadcrumbs with TIES sign election (Davari & Belilovsky, ECCV 2024;
    Yadav et al., NeurIPS 2023).

    Breadcrumbs masks (drop the top ⌊gamma·n⌋ and the smallest entries so ⌊density·n⌋
    remain), then TIES: s = sign(Σᵢ wᵢδᵢ) and
    θ = θ_base + λ · Σᵢ [sign(wᵢδᵢ) = s]·wᵢδᵢ (÷ Σ of agreeing wᵢ when normalize).

    Parameters: weight (per model, required); density (per model, default 1.0, in (0, 1]);
    gamma (per model, default 0.01, in [0, 1)); lambda (default 1.0); normalize
    (default false); int8_mask (accepted for mergekit recipes).
    """
    return _breadcrumbs(tensors, base, weight, density, gamma, lambda_, normalize, True)
