"""Passthrough: copy one model's tensor (the building block of frankenmerges)."""

from __future__ import annotations

import torch

from weightops.merge.registry import PerModel, merge_method, numerics_variant


@merge_method(
    "passthrough", max_models=1, elementwise=True, reference="https://github.com/arcee-ai/mergekit"
)
def passthrough(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    scale: PerModel[float] = None,
) -> torch.Tensor:
    """Passthrough: θ = scale · θ_source, one source per tensor.

    Used with `slices` to stack layer ranges of models into a deeper model
    ("frankenmerge"); every output tensor comes from exactly one input.

    Parameters:
      scale (per model, optional): multiply the tensor, e.g. 0 to silence a
        projection in the copied layers; unset means an exact copy.
    """
    s = scale[0]
    return tensors[0] if s is None else tensors[0] * s


# One multiplication: in the recipe's dtype it is mergekit's arithmetic as it stands.
numerics_variant("passthrough", "mergekit")(passthrough)
