"""TIES-merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from typing import Any

import torch

from weightops.merge import as_mergekit as mk
from weightops.merge.cuts import Cut, top_k_cut
from weightops.merge.registry import PerModel, Unit, merge_method, numerics_variant
from weightops.merge.sparsify import combine, magnitude, rescale_l1, task_vectors


def _ranks(params: dict[str, Any], n: int) -> list[tuple[int | None, ...]] | None:
    """Each trim keeps the k = max(1, ⌊density·n⌋) largest: a cut at ascending rank n − k.
    The L1 rescale needs whole-tensor sums in their own order, so it runs whole."""
    if params["rescale"]:
        return None
    return [(n - max(1, int(d * n)),) if d < 1 else (None,) for d in params["density"]]


@merge_method("ties", base="required", reference="https://arxiv.org/abs/2306.01708", ranks=_ranks)
def ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float],
    density: PerModel[Unit] = 1.0,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    int8_mask: bool = False,
    cuts: list[tuple[Cut | None, ...]] | None = None,
) -> torch.Tensor:
    """TIES-merging (Yadav et al., "Resolving Interference When Merging Models", NeurIPS 2023).

    δᵢ = top-k by magnitude of (θᵢ − θ_base), k = ⌊density·n⌋   (trim)
    s = sign(Σᵢ wᵢδᵢ)                                          (elect sign, ties → +)
    θ = θ_base + λ · Σᵢ [sign(wᵢδᵢ) = s]·wᵢδᵢ / Σᵢ [sign(wᵢδᵢ) = s]·wᵢ   (disjoint mean)

    Parameters:
      weight (per model, required): scale of each task vector, usually 0.3 … 1.
      density (per model, default 1.0, 0 < density ≤ 1): share of each task vector
        kept; the paper uses 0.2, LLM merges often 0.5 … 0.7.
      lambda (default 1.0): global scale of the merged task vector.
      normalize (default true): divide by the summed weights of the agreeing models.
      rescale (default false): rescale each trimmed vector to its original L1 norm.
      int8_mask: accepted so mergekit recipes run; masks here are always booleans.
    Deliberate difference from mergekit: entries whose magnitude equals the trim
    threshold are kept in index order until exactly k survive (what a stable sort
    gives), so the result depends only on the inputs. mergekit keeps whichever tied
    entries its unstable argsort puts first. Task vectors of bf16 checkpoints are
    coarsely quantized, so on dense fine-tunes a few percent of entries can tie at the
    threshold and, through the sign election, the two tools then differ beyond bf16
    rounding at those entries; with sparse task vectors (threshold 0) they agree bit
    for bit. BENCHMARKS.md shows both cases. `--numerics mergekit` keeps mergekit's
    tie order (see weightops.merge.as_mergekit).
    Large tensors run in row blocks: the engine first finds each trim's threshold and
    tie counts with an exact streaming selection (weightops.engine.select), and the
    blocks give the whole-tensor result bit for bit. With `rescale` a tensor runs whole.
    """
    del int8_mask
    deltas = task_vectors(tensors, base)
    if cuts is not None:
        # A row block of a large tensor, with the trim thresholds found beforehand.
        deltas = [top_k_cut(d, c[0]) for d, c in zip(deltas, cuts, strict=True)]
        return combine(deltas, base, weight, consensus=True, normalize=normalize, lam=lambda_)
    for i, d in enumerate(density):
        l1 = deltas[i].abs().sum() if rescale else None
        deltas[i] = magnitude(deltas[i], d)
        if l1 is not None:
            deltas[i] = rescale_l1(l1, deltas[i])
    return combine(deltas, base, weight, consensus=True, normalize=normalize, lam=lambda_)


@numerics_variant("ties", "mergekit")
def ties_as_mergekit(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    density: list[float],
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    """TIES in mergekit's order of operations and dtype."""
    deltas = [
        mk.magnitude(d, p, rescale)
        for d, p in zip(mk.task_vectors(tensors, base), density, strict=True)
    ]
    return mk.combine(
        deltas, base, weight, consensus=True, normalize=normalize, lam=lambda_, int8_mask=int8_mask
    )
