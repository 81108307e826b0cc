"""Permutation matching: bring a checkpoint's hidden units into another's order.

Two independently trained (or separately fine-tuned) networks may compute similar
features in a different order; merging them unit by unit then averages unrelated
features. Reordering the hidden units of one to match the other (weight matching,
Ainsworth et al., *Git Re-Basin*, ICLR 2023) leaves its function unchanged and puts
both in the same basis first.

- `groups`: which axes of which tensors each permutation moves, for a transformer
  checkpoint (residual stream, MLP units per layer, attention heads per layer).
- `match`: weight matching by coordinate ascent over the groups, streamed tensor by
  tensor, and applying permutations to named tensors.
- `model`: checkpoint-level use (`weightops align`, and recipes' `align:` key).
"""

from weightops.align.groups import GROUP_KINDS, AlignError, Axis, PermSpec, transformer_spec
from weightops.align.match import (
    Alignment,
    CheckpointSource,
    DictSource,
    MatchResult,
    permute,
    weight_matching,
)
from weightops.align.model import align_model, check_compatible, match_checkpoints

__all__ = [
    "GROUP_KINDS",
    "AlignError",
    "Alignment",
    "Axis",
    "CheckpointSource",
    "DictSource",
    "MatchResult",
    "PermSpec",
    "align_model",
    "check_compatible",
    "match_checkpoints",
    "permute",
    "transformer_spec",
    "weight_matching",
]
