"""DARE: drop and rescale task vectors, then add them (linear) or TIES-merge them."""

from __future__ import annotations

from typing import Any

import torch

from weightops.merge import as_mergekit as mk
from weightops.merge.registry import PerModel, Unit, merge_method, numerics_variant
from weightops.merge.sparsify import combine, random_drop, task_vectors

_DOC = """DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", ICML 2024){variant}.

    δᵢ = mᵢ ⊙ (θᵢ − θ_base) / density,   mᵢ ~ Bernoulli(density)     (drop and rescale)
    {formula}

Parameters:
  weight (per model, required): scale of each task vector.
  density (per model, default 1.0, 0 < density ≤ 1): keep probability; DARE
    tolerates 0.1 … 0.3 on LLM fine-tunes with small deltas.
  lambda (default 1.0): global scale of the merged task vector.
  normalize (default false): divide by the summed weights{agree}.
  rescale (default true): divide the kept entries by density, as in the paper, so each
    task vector keeps its expectation (mergekit instead matches the L1 norm; both are
    random and agree in expectation).
  seed (default 0): the drop masks come from this seed and the tensor's name, so a
    recipe gives the same output every run, whatever the order of work.
  int8_mask: accepted so mergekit recipes run; masks here are always booleans.
With `--numerics mergekit` the arithmetic and the L1 rescale are mergekit's; the masks
are still drawn from the seed, so the result matches mergekit in distribution only.
Large tensors run in row blocks, each drawing the same numbers as the whole tensor
would (the engine positions a generator at each input's draws); on a GPU, whose
generator does not draw entry by entry in order, and with `--numerics mergekit` (the
L1 rescale needs whole-tensor sums), a tensor runs whole.
"""


def _draws(params: dict[str, Any], shape: tuple[int, ...]) -> list[bool]:
    """Each input with density < 1 draws one number per entry; the drop is elementwise."""
    return [d < 1 for d in params["density"]]


def _register(name: str, *, consensus: bool, doc: str) -> None:
    def dare(
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        *,
        weight: PerModel[float],
        density: PerModel[Unit] = 1.0,
        lambda_: float = 1.0,
        normalize: bool = False,
        rescale: bool = True,
        seed: int = 0,
        int8_mask: bool = False,
        rng: list[torch.Generator | None] | None = None,
    ) -> torch.Tensor:
        deltas = task_vectors(tensors, base)
        for i, d in enumerate(density):
            deltas[i] = random_drop(deltas[i], d, rng[i] if rng else None)
            if rescale and d < 1:
                deltas[i].div_(d)
        return combine(deltas, base, weight, consensus=consensus, normalize=normalize, lam=lambda_)

    def dare_as_mergekit(
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        *,
        weight: list[float],
        density: list[float],
        lambda_: float = 1.0,
        normalize: bool = False,
        rescale: bool = True,
        seed: int = 0,
        int8_mask: bool = False,
        rng: torch.Generator | None = None,
    ) -> torch.Tensor:
        deltas = [
            mk.bernoulli(d, p, rescale, rng)
            for d, p in zip(mk.task_vectors(tensors, base), density, strict=True)
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

    dare.__name__ = dare.__qualname__ = name
    dare.__doc__ = doc
    merge_method(name, base="required", reference="https://arxiv.org/abs/2311.03099", draws=_draws)(
        dare
    )
    numerics_variant(name, "mergekit")(dare_as_mergekit)


_register(
    "dare_linear",
    consensus=False,
    doc=_DOC.format(variant="", formula="θ = θ_base + λ · Σᵢ wᵢ·δᵢ", agree=""),
)
_register(
    "dare_ties",
    consensus=True,
    doc=_DOC.format(
        variant=", with TIES sign election",
        formula="θ = θ_base + λ · Σᵢ [sign(wᵢδᵢ) = s]·wᵢδᵢ,  s = sign(Σᵢ wᵢδᵢ)",
        agree=" of the models agreeing in sign",
    ),
)
