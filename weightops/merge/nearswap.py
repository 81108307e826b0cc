"""NearSwap: take the other model's value where it is already close to the base's."""

from __future__ import annotations

from typing import Annotated

import torch

from weightops.merge.registry import Range, merge_method, numerics_variant

# Differences are floored here so that equal entries give weight t / 1e-6, not t / 0.
_MIN_DIFF = 1e-6


@merge_method(
    "nearswap",
    base="required",
    min_models=1,
    max_models=1,
    elementwise=True,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)
def nearswap(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    t: Annotated[float, Range(ge=0)],
) -> torch.Tensor:
    """NearSwap (alchemonaut, QuartetAnemoi-70B, 2024; mergekit's `nearswap`).

    Entry by entry, the closer the other model is to the base, the more of it is taken:
      w = clamp(t / max(|θ_other − θ_base|, 1e-6), 0, 1)
      θ = w·θ_other + (1 − w)·θ_base
    Entries within t of each other are swapped outright (w = 1); farther ones move
    towards the other model by t/|Δ| of the way, i.e. by exactly t in absolute terms.

    Parameters:
      t (required, ≥ 0): the distance below which entries are swapped. 0 keeps the
        base; the method's namesake uses 1e-4, and values around the typical size of
        a fine-tune's changes (1e-4 … 1e-2 for LLMs) pull in its small changes while
        capping large ones; t ≥ max |Δ| returns the other model.
    Exactly one model besides base_model.
    """
    other = tensors[0]
    w = torch.sub(other, base).abs_().clamp_(min=_MIN_DIFF).reciprocal_().mul_(t).clamp_(0, 1)
    return base.lerp_(other, w)


@numerics_variant("nearswap", "mergekit")
def nearswap_as_mergekit(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    t: float,
) -> torch.Tensor:
    """NearSwap in the inputs' dtype: t / |Δ| as torch evaluates a number over a tensor
    (the reciprocal, rounded, times t), then w·θ_other + (1 − w)·θ_base, each product
    rounded."""
    other = tensors[0]
    w = (t / torch.abs(base - other).clamp(min=_MIN_DIFF)).clamp(min=0, max=1)
    return w * other + (1 - w) * base
