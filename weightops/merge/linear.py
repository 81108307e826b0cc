"""Linear: weighted average of the inputs."""

from __future__ import annotations

import torch

from weightops.merge.registry import NonNegative, PerModel, merge_method, numerics_variant


@merge_method(
    "linear", min_models=1, elementwise=True, reference="https://arxiv.org/abs/2203.05482"
)
def linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[NonNegative],
    normalize: bool = True,
) -> torch.Tensor:
    """Weighted average of the inputs (Wortsman et al., "Model soups", ICML 2022).

    θ = Σᵢ wᵢ·θᵢ / Σᵢ wᵢ   (without the division when normalize is false)

    Parameters:
      weight (per model, required, ≥ 0): the mixing weight of each model.
      normalize (default true): divide by the sum of the weights, so weights need not
        sum to 1. With normalize the weights of a tensor must not all be 0.
    base_model is not used: list every model to average under `models`.
    """
    total = sum(weight)
    out = tensors[0].mul_(weight[0])
    for t, w in zip(tensors[1:], weight[1:], strict=True):
        out.add_(t, alpha=w)
    if normalize:
        if total == 0:
            raise ValueError("the weights sum to 0, so they cannot be normalized")
        out /= total
    return out


@numerics_variant("linear", "mergekit")
def linear_as_mergekit(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    normalize: bool = True,
) -> torch.Tensor:
    """mergekit's order: the weights as a tensor of the inputs' dtype, the weighted
    inputs stacked and summed over the models, then divided by the weights' sum (itself
    rounded to that dtype)."""
    stacked = torch.stack(tensors, dim=0)
    w = torch.tensor(weight, dtype=stacked.dtype, device=stacked.device)
    w = w.view(-1, *([1] * (stacked.dim() - 1)))
    out = (w * stacked).sum(dim=0)
    return out / w.sum(dim=0) if normalize else out
