"""Model Stock: interpolate the average of fine-tunes towards the base by their angle."""

from __future__ import annotations

import torch

from weightops.merge.registry import merge_method, numerics_variant


@merge_method(
    "model_stock", base="required", min_models=2, reference="https://arxiv.org/abs/2403.19522"
)
def model_stock(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    filter_wise: bool = False,
) -> torch.Tensor:
    """Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned
    models", ECCV 2024).

    With k fine-tunes and δᵢ = θᵢ − θ_base, cos θ is the mean pairwise cosine between
    the δᵢ; t = k·cos θ / (1 + (k − 1)·cos θ); θ = t·mean(θᵢ) + (1 − t)·θ_base.
    Where 1 + (k − 1)·cos θ ≈ 0 (|·| < 1e-6) there is no finite estimate and the base
    is kept.

    Parameters:
      filter_wise (default false): one cosine per output row instead of per tensor.
    Needs base_model and at least two other models. No weights: the geometry sets them.
    """
    k = len(tensors)
    shape = base.shape
    if filter_wise:
        flat = base.reshape(1, -1) if base.dim() < 2 else base.reshape(shape[0], -1)
    else:
        flat = base.reshape(1, -1)
    deltas = [t.reshape(flat.shape) - flat for t in tensors]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in deltas]
    cosines = [
        ((deltas[i] * deltas[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1, denom))
    average = torch.stack(tensors).mean(0).reshape(flat.shape)
    return (t * average + (1 - t) * flat).reshape(shape)


@numerics_variant("model_stock", "mergekit")
def model_stock_as_mergekit(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    filter_wise: bool = False,
) -> torch.Tensor:
    """mergekit's order in the inputs' dtype: per-row cosines over the last axis
    (filter_wise; vectors as one row) or one over the flattened tensor, their mean, no
    guard for a vanishing denominator, and the average as a running sum."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if base.dim() == 1 else w for w in tensors]
    else:
        w0 = base.view(-1)
        ws = [w.view(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = torch.norm(offsets[i], dim=-1) * torch.norm(offsets[j], dim=-1)
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    t = (k * cos) / (1 + (k - 1) * cos)
    total = ws[0]
    for w in ws[1:]:
        total = total + w
    return (t * (total / k) + (1 - t) * w0).reshape(shape)
