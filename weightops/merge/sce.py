"""SCE: select high-variance entries, calculate per-tensor weights, erase sign conflicts."""

from __future__ import annotations

import torch

from weightops.merge import as_mergekit as mk
from weightops.merge.registry import Unit, merge_method, numerics_variant
from weightops.merge.sparsify import combine, task_vectors, top_k


@merge_method("sce", base="required", min_models=2, reference="https://arxiv.org/abs/2408.07990")
def sce(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    select_topk: Unit = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """SCE, "select, calculate, erase" (Wan et al., "FuseChat: Knowledge Fusion of Chat
    Models", 2024, arXiv 2408.07990).

    With n task vectors δᵢ = θᵢ − θ_base of one tensor:
      select: vⱼ = (1/n) Σᵢ (δᵢⱼ − δ̄ⱼ)² is the variance across models at entry j; of the
        N entries with vⱼ > 0, keep the k = ⌊select_topk·N⌋ of largest variance in
        every δᵢ and zero the rest (equal variances kept in index order; k = 0 zeros
        everything, so the tensor stays the base's).
      calculate: wᵢ = mean(δᵢ²) / Σₗ mean(δₗ²) over the selected δ (equal weights
        1/n when every selected δ is zero).
      erase: s = sign(Σᵢ δᵢ) (unweighted, 0 counting as +); δᵢⱼ survives where
        sign(δᵢⱼ) = sⱼ, and exact zeros never do.
      θ = θ_base + Σᵢ [sign(δᵢ) = s]·wᵢδᵢ / Σᵢ [sign(δᵢ) = s]·wᵢ    (θ_base where none survive)

    Parameters:
      select_topk (default 1.0, 0 < select_topk ≤ 1): share of the varying entries
        kept (τ in the paper, which uses 0.1); 1 skips the selection.
      int8_mask: accepted so mergekit recipes run; masks here are always booleans.
    Needs base_model and at least two other models. No per-model weights: the
    calculate step sets them (a `weight` in a recipe is an error, not ignored).
    Deliberate differences from mergekit: equal variances are ranked in index order,
    not by an unstable sort; the weights follow the formula whenever some selected δ
    is nonzero (mergekit falls back to equal weights once Σ mean(δ²) < 1e-6, which
    holds for many tensors of real fine-tunes with |δ| ≲ 1e-3); and the divisor is
    the exact sum of surviving weights (mergekit floors it at 1e-6). `--numerics
    mergekit` repeats mergekit's fallback, floor and ranking.
    """
    del int8_mask
    if base.numel() == 0:
        return base
    deltas = task_vectors(tensors, base)
    if select_topk < 1:
        keep = _high_variance(deltas, select_topk)
        for d in deltas:
            d.mul_(keep)
    energy = [float(torch.linalg.vector_norm(d)) ** 2 / d.numel() for d in deltas]
    total = sum(energy)
    weights = [e / total for e in energy] if total > 0 else [1 / len(deltas)] * len(deltas)
    return combine(
        deltas,
        base,
        weights,
        consensus=True,
        normalize=True,
        lam=1.0,
        elect_weights=[1.0] * len(deltas),
    )


def _high_variance(deltas: list[torch.Tensor], share: float) -> torch.Tensor:
    """The entries whose variance across the deltas is among the top `share` of the
    entries with nonzero variance."""
    n = len(deltas)
    # Centred on the first delta so that entries where every model agrees get exactly
    # 0, whatever the rounding of the mean.
    shift = deltas[0]
    mean = torch.zeros_like(shift)
    for d in deltas[1:]:
        mean.add_(d).sub_(shift)
    mean.div_(n)
    var = mean.square()  # the first delta's term, (δ₀ − shift − mean)² = mean²
    for d in deltas[1:]:
        var.add_((d - shift).sub_(mean).square_())
    del mean
    var.div_(n)
    k = int(int(torch.count_nonzero(var)) * share)
    if k == 0:
        return torch.zeros_like(var, dtype=torch.bool)
    return top_k(var, k) != 0


@numerics_variant("sce", "mergekit")
def sce_as_mergekit(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """SCE in mergekit's dtype and order: the variance is `torch.var` of the stacked
    task vectors, ranked by `torch.topk`; the weights are mean(δ²) over their sum, equal
    once that sum is below 1e-6; the divisor is floored at 1e-6."""
    if not tensors:
        return base
    mask_dtype = torch.int8 if int8_mask else base.dtype
    stacked = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        stacked = stacked * _top_variance(stacked, select_topk, mask_dtype).unsqueeze(0)
    agree = mk.sign_agreement(stacked, mask_dtype)
    energy = torch.mean(stacked**2, dim=list(range(1, stacked.dim())))
    total = torch.sum(energy).item()
    flat = abs(total) < 1e-6
    weights = torch.ones_like(energy) / energy.shape[0] if flat else energy / total
    weights = weights.view(-1, *([1] * (stacked.dim() - 1)))
    kept = weights * agree
    mixed = (stacked * kept).sum(dim=0)
    return base + mixed / torch.sum(kept, dim=0).clamp(min=1e-6)


def _top_variance(stacked: torch.Tensor, share: float, dtype: torch.dtype) -> torch.Tensor:
    if share <= 0:
        return torch.zeros_like(stacked, dtype=dtype)
    var = torch.var(stacked, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * share)
    if k == 0:
        return torch.zeros_like(stacked, dtype=dtype)
    mask = torch.zeros_like(var, dtype=dtype)
    mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask
