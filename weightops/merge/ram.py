"""RAM and RAM+: keep each task's unique changes whole, average the shared ones."""

from __future__ import annotations

import torch

from weightops.merge.registry import NonNegative, merge_method
from weightops.merge.sparsify import task_vectors

_PAPER = "https://arxiv.org/abs/2601.13572"

_DOC = """{title} (Reinforced Agent Merging, arXiv:2601.13572, 2026; mergekit's `{name}`).

Built for RL-trained agents, whose task vectors are sparse: averaging them dilutes
changes that only one agent made. An entry of δᵢ = θᵢ − θ_base is active when
|δᵢ| > epsilon; c counts the models active at a position:
  c = 0: the base is kept;  c = 1 (unique): that model's change is added whole;
  c > 1 (shared): the active changes are averaged.
{formula}
Parameters:
  epsilon (default 1e-5, ≥ 0): changes of at most this size count as no change.
    Entries a fine-tune left untouched have δ = 0 exactly, so any epsilon keeps them
    inactive; a larger one also ignores tiny changes, making more entries unique.{extra}
base_model plus one or more models; no per-model weights.
"""

_RAM = """  θ = θ_base + Σᵢ [|δᵢ| > ε]·δᵢ / max(c, 1)
(the mean of the active changes at each position).
"""

_RAMPLUS = """For each model, ρᵢ = (its active entries at shared positions) / max(its active
entries at unique positions, ε), counted within the tensor ("tensor-local", where the
paper counts over the whole model), and its unique changes are scaled up to make up
for the dilution of its shared ones:
  λᵢ = 1 + r·clamp(ρᵢ, 0, α)
  θ = θ_base + Σᵢ [|δᵢ| > ε]·δᵢ·(λᵢ if c = 1 else 1/c)
"""

_RAMPLUS_PARAMS = """
  r (default 0.1, ≥ 0): strength of the unique-change boost.
  alpha (default 0.2, ≥ 0): cap on ρᵢ, so λᵢ ≤ 1 + r·alpha (1.02 by default)."""


def _active(
    tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The task vectors with inactive entries zeroed, and c, the active count per entry."""
    deltas = task_vectors(tensors, base)
    count = torch.zeros_like(base)
    for d in deltas:
        active = d.abs() > epsilon
        d.mul_(active)
        count.add_(active)
    return deltas, count


def _shared_mean(deltas: list[torch.Tensor], count: torch.Tensor) -> torch.Tensor:
    """Σᵢ δᵢ / max(c, 1): unique changes whole, shared ones averaged (sums into δ₁)."""
    total = deltas[0]
    for d in deltas[1:]:
        total.add_(d)
    return total.div_(count.clamp(min=1))


def ram(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    epsilon: NonNegative = 1e-5,
) -> torch.Tensor:
    deltas, count = _active(tensors, base, epsilon)
    return base.add_(_shared_mean(deltas, count))


def ramplus_tl(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    r: NonNegative = 0.1,
    alpha: NonNegative = 0.2,
    epsilon: NonNegative = 1e-5,
) -> torch.Tensor:
    deltas, count = _active(tensors, base, epsilon)
    unique = count == 1
    shared = count > 1
    # At unique positions c = 1, so λᵢ·δᵢ = δᵢ/c + (λᵢ − 1)·δᵢ: RAM plus a boost there.
    boost = torch.zeros_like(base)
    for d in deltas:
        active = d != 0
        n_unique = int((active & unique).sum())
        if n_unique == 0:
            continue  # nothing of this model's to boost (and ρ would divide by ε or 0)
        rho = int((active & shared).sum()) / max(n_unique, epsilon)
        boost.add_(d, alpha=r * min(max(rho, 0.0), alpha))
    merged = _shared_mean(deltas, count).add_(boost.mul_(unique))
    return base.add_(merged)


ram.__doc__ = _DOC.format(title="RAM", name="ram", formula=_RAM, extra="")
ramplus_tl.__doc__ = _DOC.format(
    title="RAM+, tensor-local", name="ramplus_tl", formula=_RAMPLUS, extra=_RAMPLUS_PARAMS
)
merge_method("ram", base="required", elementwise=True, reference=_PAPER)(ram)
merge_method("ramplus_tl", base="required", reference=_PAPER)(ramplus_tl)
