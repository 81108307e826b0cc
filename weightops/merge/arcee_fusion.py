"""Arcee Fusion: keep only the other model's most important changes to the base."""

from __future__ import annotations

import torch

from weightops.merge.registry import merge_method

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
    are kept, so the base comes back unchanged.
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
