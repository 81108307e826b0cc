"""DELLA: drop task-vector entries at random, the smaller ones more often, then add the
rest (linear) or TIES-merge them."""

from __future__ import annotations

from typing import Any

import torch

from weightops.merge import as_mergekit as mk
from weightops.merge.registry import NonNegative, PerModel, Unit, merge_method, numerics_variant
from weightops.merge.sparsify import combine, magnitude_sample, task_vectors

# density ± epsilon may touch 0 or 1 up to rounding of the recipe's decimals.
_SLACK = 1e-9

_DOC = """DELLA (Deep et al., "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", 2024, arXiv 2406.11617){variant}.

Per task vector δᵢ = θᵢ − θ_base, within each row (the whole tensor for 1-D tensors,
else each index of the first dimension, everything after it flattened), rank the m
entries by |δ| from r = 0 (smallest) to m − 1 (largest; equal magnitudes ranked in
index order) and keep each entry independently with probability
    pᵣ = density − epsilon + 2·epsilon · r / (m − 1)       (MagPrune)
so keep rates run linearly from density − epsilon to density + epsilon and average
density; a one-entry row keeps with probability density. Kept entries become δ / pᵣ
with `rescale`, which keeps every entry's expectation. Then
    {formula}

Parameters:
  weight (per model, required): scale of each task vector.
  density (per model, default 1.0, 0 < density ≤ 1): mean keep rate; 1 keeps the task
    vector whole (epsilon is then not used). The paper tunes it in 0.3 … 0.7.
  epsilon (per model, default 0.15, ≥ 0): half-width of the keep-rate range; needs
    0 ≤ density − epsilon and density + epsilon ≤ 1 (checked while planning), so the
    default fits densities from 0.15 to 0.85. epsilon 0 is DARE's uniform drop.
  lambda (default 1.0): global scale of the merged task vector.
  normalize (default {normalize}): divide by the summed weights{agree}.
  rescale (default true): divide each kept entry by its keep probability, as in the
    paper (mergekit instead scales the whole tensor to its former L1 norm; both agree
    in expectation only).
  seed (default 0): the drop masks come from this seed and the tensor's name, so a
    recipe gives the same output every run, whatever the order of work.
  int8_mask: accepted so mergekit recipes run; masks here are always booleans.
Deliberate differences from mergekit: equal magnitudes are ranked in index order, not
by an unstable sort; tensors of three or more dimensions are ranked over each
first-dimension slice (mergekit ranks along the second dimension only); the bounds on
density ± epsilon are closed (mergekit rejects density ± epsilon equal to 0 or 1).
With `--numerics mergekit` the ranking, keep rates, bounds and L1 rescale are
mergekit's (see weightops.merge.as_mergekit); the masks are still drawn from the seed,
so the result matches mergekit in distribution only.
Tensors of two or more dimensions, whose rows are ranked apart, run in row blocks when
large, each block drawing the same numbers as the whole tensor would; 1-D tensors (one
ranking over all entries), tensors on a GPU (whose generator does not draw entry by
entry in order) and `--numerics mergekit` run whole.
"""


def epsilon_problem(params: dict[str, Any]) -> str | None:
    """What is wrong with a tensor's density and epsilon values, or None."""
    for d, e in zip(params["density"], params["epsilon"], strict=True):
        if d < 1 and (d - e < -_SLACK or d + e > 1 + _SLACK):
            return (
                f"density {d:g} ± epsilon {e:g} gives keep rates {d - e:g} … {d + e:g}, "
                f"outside [0, 1]; use epsilon ≤ {min(d, 1 - d):g}"
            )
    return None


def _draws(params: dict[str, Any], shape: tuple[int, ...]) -> list[bool] | None:
    """Each input with density < 1 draws one number per entry, row by row; the ranks
    are per row, so blocks of rows are independent unless the tensor is one row."""
    if len(shape) < 2:
        return None
    return [d < 1 for d in params["density"]]


def _register(name: str, *, consensus: bool, normalize_default: bool, doc: str) -> None:
    def della(
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        *,
        weight: PerModel[float],
        density: PerModel[Unit] = 1.0,
        epsilon: PerModel[NonNegative] = 0.15,
        lambda_: float = 1.0,
        normalize: bool = normalize_default,
        rescale: bool = True,
        seed: int = 0,
        int8_mask: bool = False,
        rng: list[torch.Generator | None] | None = None,
    ) -> torch.Tensor:
        if msg := epsilon_problem({"density": density, "epsilon": epsilon}):
            raise ValueError(msg)
        deltas = task_vectors(tensors, base)
        for i, (d, e) in enumerate(zip(density, epsilon, strict=True)):
            g = rng[i] if rng else None
            deltas[i] = magnitude_sample(deltas[i], d, e, g, rescale=rescale)
        return combine(deltas, base, weight, consensus=consensus, normalize=normalize, lam=lambda_)

    def della_as_mergekit(
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        *,
        weight: list[float],
        density: list[float],
        epsilon: list[float],
        lambda_: float = 1.0,
        normalize: bool = normalize_default,
        rescale: bool = True,
        seed: int = 0,
        int8_mask: bool = False,
        rng: torch.Generator | None = None,
    ) -> torch.Tensor:
        deltas = [
            mk.magprune(d, p, e, rescale, rng)
            for d, p, e in zip(mk.task_vectors(tensors, base), density, epsilon, strict=True)
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

    della.__name__ = della.__qualname__ = name
    della.__doc__ = doc
    merge_method(
        name,
        base="required",
        reference="https://arxiv.org/abs/2406.11617",
        check=epsilon_problem,
        draws=_draws,
    )(della)
    numerics_variant(name, "mergekit")(della_as_mergekit)


_register(
    "della",
    consensus=True,
    normalize_default=True,
    doc=_DOC.format(
        variant=", with TIES sign election",
        formula="θ = θ_base + λ · Σᵢ [sign(wᵢδᵢ) = s]·wᵢδᵢ,  s = sign(Σᵢ wᵢδᵢ)",
        normalize="true",
        agree=" of the models agreeing in sign",
    ),
)
_register(
    "della_linear",
    consensus=False,
    normalize_default=False,
    doc=_DOC.format(variant="", formula="θ = θ_base + λ · Σᵢ wᵢ·δᵢ", normalize="false", agree=""),
)
