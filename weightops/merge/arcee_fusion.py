"""Arcee Fusion: keep only the other model's most important changes to the base."""

from __future__ import annotations

import torch

from weightops.merge.registry import merge_method, numerics_variant

# Larger tensors take their quartiles from this many entries drawn at random.
_SAMPLE = 1_000_000
# Added to both softmax distributions before the KL divergence, so log(p/q) is finite.
_KL_EPS = 1e-8


@merge_method(
    "arcee_fusion",
    base="required",
    min_models=1,
    max_models=1,
    reference="https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
)
def arcee_fusion(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    seed: int = 0,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Arcee Fusion (Arcee AI, mergekit v0.1, 2025; mergekit's `arcee_fusion`).

    Each entry's importance is its change times the KL divergence of its row
    (the vectors along the last dimension, read as logits through a softmax):
      p = softmax(θ_other) + 1e-8,  q = softmax(θ_base) + 1e-8   (per row)
      sᵢ = |θ_other,ᵢ − θ_base,ᵢ| · Σ_row p·log(p/q)
    The threshold is an outlier fence on the importances, τ = Q₂ + 1.5·(Q₃ − Q₁),
    with Q_k the entry of rank ⌊(k/4)·(n − 1)⌋ (from 0) among the n sorted scores;
    only the changes scoring at least τ are kept:
      θ = θ_base + [s ≥ τ]·(θ_other − θ_base)
    Tensors of more than 10⁶ entries take the quartiles from 10⁶ scores drawn at
    random (with replacement here; without in mergekit), so the threshold is an
    estimate there, reproducible from the seed.

    Parameters:
      seed (default 0): the sample of scores for large tensors comes from this seed
        and the tensor's name.
    Exactly one model besides base_model; no weights or thresholds to tune. Where
    the other model equals the base every score is 0, τ = 0 and all (zero) changes
    are kept, so the base comes back unchanged. `--numerics mergekit` repeats
    mergekit's arithmetic: scores, softmax and quartiles in the inputs' dtype, the
    median and the two other quartiles from separate samples (without replacement,
    from the seed) on large tensors, and base + kept change added in fp32, which is
    written in fp32 unless the recipe sets `out_dtype`.
    """
    del seed
    other = tensors[0]
    if other.numel() == 0:
        return base
    kl = _row_kl(other, base)
    delta = other.sub_(base)
    score = delta.abs().mul_(kl.unsqueeze(-1) if delta.dim() > 0 else kl)
    keep = score >= _fence(score.view(-1), rng)
    return base.add_(delta.mul_(keep))


def _row_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)) along the last dimension, each softmax + 1e-8."""
    p = torch.softmax(p_logits, dim=-1).add_(_KL_EPS)
    q = torch.softmax(q_logits, dim=-1).add_(_KL_EPS)
    log_ratio = torch.div(p, q, out=q).log_()
    return log_ratio.mul_(p).sum(dim=-1)


def _fence(scores: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """Q₂ + 1.5·(Q₃ − Q₁) of the scores (or of a random sample of 10⁶ of them)."""
    if scores.numel() > _SAMPLE:
        picks = torch.randint(scores.numel(), (_SAMPLE,), generator=rng, device=scores.device)
        scores = scores[picks]
    last = scores.numel() - 1

    def rank(k: int) -> torch.Tensor:
        return torch.kthvalue(scores, k + 1).values

    q1, q2, q3 = rank(last // 4), rank(last // 2), rank(3 * last // 4)
    return q2 + 1.5 * (q3 - q1)


@numerics_variant("arcee_fusion", "mergekit", widens_to=torch.float32)
def arcee_fusion_as_mergekit(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    seed: int = 0,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Arcee Fusion in mergekit's dtype and order; the mask is fp32, so the kept
    changes and the sum with the base are fp32, rounded once on output."""
    other = tensors[0]
    diff = (other - base).abs()
    p = torch.softmax(other, dim=-1) + _KL_EPS
    q = torch.softmax(base, dim=-1) + _KL_EPS
    score = diff * torch.sum(p * torch.log(p / q), dim=-1).unsqueeze(-1)
    (q2,) = _quantiles(score, [0.5], rng)
    q1, q3 = _quantiles(score, [0.25, 0.75], rng)
    keep = (score >= q2 + 1.5 * (q3 - q1)).float()
    return base + (other - base) * keep


def _quantiles(scores: torch.Tensor, qs: list[float], rng: torch.Generator | None) -> torch.Tensor:
    """Entries of rank ⌊q·(n − 1)⌋ (q·(n − 1) in fp32) of the sorted scores, from a
    sample of 10⁶ without replacement when there are more."""
    flat = scores.view(-1)
    if flat.numel() > _SAMPLE:
        picks = torch.randperm(flat.numel(), generator=rng, device=flat.device)[:_SAMPLE]
        flat = flat[picks]
    ranks = (torch.tensor(qs) * (flat.numel() - 1)).long()
    return torch.sort(flat).values[ranks.to(flat.device)]
