"""Task arithmetic: add weighted task vectors to the base."""

from __future__ import annotations

import torch

from weightops.merge import as_mergekit as mk
from weightops.merge.registry import PerModel, merge_method, numerics_variant
from weightops.merge.sparsify import combine, task_vectors


@merge_method(
    "task_arithmetic",
    base="required",
    elementwise=True,
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float],
    lambda_: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

    θ = θ_base + λ · Σᵢ wᵢ·(θᵢ − θ_base)   (divided by Σᵢ wᵢ when normalize is true)

    Parameters:
      weight (per model, required): scale of each task vector; negative weights
        subtract a task ("forgetting"). Typical range −1 … 1.
      lambda (default 1.0): global scale of the summed task vectors, typically 0.3 … 1.5.
      normalize (default false): divide by Σ wᵢ (skipped when it is 0).
    """
    deltas = task_vectors(tensors, base)
    return combine(deltas, base, weight, consensus=False, normalize=normalize, lam=lambda_)


@numerics_variant("task_arithmetic", "mergekit")
def task_arithmetic_as_mergekit(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    lambda_: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Task arithmetic in mergekit's order of operations and dtype."""
    deltas = mk.task_vectors(tensors, base)
    return mk.combine(deltas, base, weight, consensus=False, normalize=normalize, lam=lambda_)
