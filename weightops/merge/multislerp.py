"""Multi-SLERP: spherical blend of several models (or task vectors) by weight."""

from __future__ import annotations

from typing import Annotated

import torch

from weightops.merge.registry import PerModel, Range, merge_method, numerics_variant


@merge_method(
    "multislerp",
    base="optional",
    min_models=1,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
def multislerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float],
    normalize_weights: bool = True,
    eps: Annotated[float, Range(gt=0)] = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (Goddard, "Multi-SLERP", 2024;
    mergekit's `multislerp`).

    With xᵢ the flattened inputs (θᵢ − θ_base with base_model), nᵢ = ‖xᵢ‖,
    uᵢ = xᵢ / (nᵢ + eps) and wᵢ the weights (divided by Σwᵢ with normalize_weights):
      m = Σᵢ wᵢuᵢ,  m̂ = m / ‖m‖
      project each uᵢ to the tangent space at m̂, vᵢ = uᵢ − (uᵢ·m̂)m̂, blend τ = Σᵢ wᵢvᵢ,
      map back with exp_m̂(τ) = cos‖τ‖·m̂ + sin‖τ‖·τ/‖τ‖, and rescale by Σᵢ wᵢnᵢ.
    Because m̂ is the direction of Σᵢ wᵢuᵢ, τ = m − (m·m̂)m̂ = 0 exactly, so the
    exponential map returns m̂ and the result is computed directly as
      θ = θ_base + (Σᵢ wᵢnᵢ) · m̂
    (the normalised weighted mean of directions, with the weighted mean norm). For two
    inputs this is normalised linear interpolation of the directions, not SLERP: the
    two agree at equal weights, but for orthogonal unit vectors at weights ¾, ¼ the
    result lies atan(1/3) ≈ 18.4° from the first where SLERP's lies 22.5° from it.
    When ‖m‖ < eps (the weighted directions cancel), two inputs are blended linearly,
    Σᵢ wᵢxᵢ, as are inputs whose weighted norms are all zero (nothing to interpolate,
    e.g. a tensor no fine-tune changed); otherwise the tensor is an error. A single
    input is returned as it is.

    Parameters:
      weight (per model, required): each model's share; usually positive.
      normalize_weights (default true): divide the weights by their sum, which must
        then not be 0. Without it the output norm scales with Σᵢ wᵢ.
      eps (default 1e-8, > 0): added to the norms before dividing, and the smallest
        ‖m‖ that still gives a direction.
    base_model is optional: with it the task vectors are blended and added back.
    `--numerics mergekit` follows mergekit's route through the tangent space instead
    of the closed form, in the inputs' dtype, where τ is rounding noise rather than 0.
    """
    if len(tensors) == 1:
        return tensors[0]
    w = list(weight)
    if normalize_weights:
        total = sum(w)
        if total == 0:
            raise ValueError("the weights sum to 0, so they cannot be normalized")
        w = [x / total for x in w]
    if base is not None:
        for x in tensors:
            x.sub_(base)
    norms = [torch.linalg.vector_norm(x).item() for x in tensors]
    mean = torch.zeros_like(tensors[0])
    for x, wi, ni in zip(tensors, w, norms, strict=True):
        mean.add_(x, alpha=wi / (ni + eps))
    mean_norm = torch.linalg.vector_norm(mean).item()
    if mean_norm < eps:
        if len(tensors) != 2 and any(wi * ni != 0 for wi, ni in zip(w, norms, strict=True)):
            raise ValueError(
                "the weighted directions of the inputs cancel out (antipodal tensors with "
                "balancing weights), so they have no spherical mean; change the weights"
            )
        out = mean.zero_()
        for x, wi in zip(tensors, w, strict=True):
            out.add_(x, alpha=wi)
    else:
        scale = sum(wi * ni for wi, ni in zip(w, norms, strict=True))
        out = mean.mul_(scale / mean_norm)
    return out if base is None else out.add_(base)


@numerics_variant("multislerp", "mergekit")
def multislerp_as_mergekit(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Multi-SLERP as mergekit computes it: weights in the inputs' dtype, the tangent
    projection and exponential map evaluated step by step (‖τ‖ + eps as its norm),
    and a linear blend of two inputs whose weighted directions cancel."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(weight, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise ValueError(
                "the weighted directions of the inputs cancel out (antipodal tensors with "
                "balancing weights), so they have no spherical mean; change the weights"
            )
        out = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return out if base is None else out + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tau = (tangents * w.view(-1, 1)).sum(0)
    tau_norm = torch.norm(tau) + eps
    out = mean * torch.cos(tau_norm) + tau * (torch.sin(tau_norm) / tau_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return out if base is None else out + base
