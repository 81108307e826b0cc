"""Permutation groups of a transformer checkpoint, derived from tensor roles and config.

A permutation group is a set of hidden units that can be reordered without changing
the function, provided every tensor that touches them is reordered the same way along
the right axis. A `PermSpec` records, for every tensor, which group (if any) indexes
each of its axes, and how: an axis may hold several consecutive *parts* (GPT-2's fused
`c_attn` is [q | k | v]), and inside a part each unit may span a *block* of entries
(a head is `head_dim` consecutive rows) or stand for `stride` units of the group (a
key/value head serves `stride` query heads under GQA).

The groups of a transformer:

- `residual`: the residual-stream features. Shared by the token and position
  embeddings, every norm's gain and bias (RMSNorm, LayerNorm and Gemma's (1 + w) norm
  all act feature-wise after a permutation-invariant statistic), the input side of
  every projection reading from the stream (q/k/v, gate/up, lm_head) and the output
  side (and bias) of every projection writing to it (o_proj, down_proj).
- `mlp.L`: the hidden units of layer L's MLP: gate/up rows and their biases, down_proj
  columns (for GPT-2's Conv1D layout, c_fc columns and c_proj rows).
- `heads.L`: the query heads of layer L, permuted as whole heads and only in ways that
  keep GQA intact: a key/value head moves with its group of query heads, and query
  heads may also be reordered inside their group. q/k/v rows and biases, per-head q/k
  norms and o_proj columns follow. The dimensions inside a head never move, so RoPE's
  rotation pairs stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from weightops.arch import describe, family, text_config
from weightops.errors import WeightopsError

GROUP_KINDS = ("residual", "mlp", "heads")

# Fused projections whose inputs and outputs are stored (in, out) rather than (out, in).
_CONV1D_FAMILIES = ("gpt2",)
# Buffers some checkpoints store that carry no hidden features.
_FEATURELESS = (".inv_freq", ".attn.bias", ".attn.masked_bias")


class AlignError(WeightopsError):
    """Two checkpoints cannot be aligned (architecture, shapes, unsupported tensors)."""


@dataclass(frozen=True)
class Axis:
    """How one tensor axis is indexed by the units of `group`.

    `parts` lists (stride, block) for each consecutive part of the axis: the part holds
    size/stride units of `block` entries each, and unit u of it follows unit u·stride
    of the group's permutation (so a stride-r part moves with whole blocks of r units).
    """

    group: str
    parts: tuple[tuple[int, int], ...] = ((1, 1),)

    def length(self, units: int) -> int:
        return sum(units // stride * block for stride, block in self.parts)


@dataclass
class PermSpec:
    """Tensor name -> one Axis (or None) per dimension, and each group's unit count."""

    axes: dict[str, tuple[Axis | None, ...]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, shape: tuple[int, ...], axes: tuple[Axis | None, ...]) -> None:
        if len(axes) != len(shape):
            raise AlignError(f"{name}: {len(shape)}-D tensor given {len(axes)} axes")
        seen = [a.group for a in axes if a is not None]
        if len(set(seen)) != len(seen):
            # The matching step for a group assumes it is linear in that group's
            # permutation, which a tensor indexed twice by it is not.
            raise AlignError(f"{name}: the same group indexes two axes")
        for dim, axis in zip(shape, axes, strict=True):
            if axis is None:
                continue
            units = self.sizes.get(axis.group)
            if units is None:
                raise AlignError(f"{name}: group {axis.group!r} has no declared size")
            if any(units % s for s, _ in axis.parts) or axis.length(units) != dim:
                raise AlignError(
                    f"{name}: axis of size {dim} does not fit {units} units of group {axis.group!r}"
                )
        if any(a is not None for a in axes):
            self.axes[name] = axes

    def strides(self, group: str) -> set[int]:
        return {
            s
            for axes in self.axes.values()
            for a in axes
            if a and a.group == group
            for s, _ in a.parts
        }

    def touching(self, group: str) -> list[tuple[str, int]]:
        """(tensor name, axis index) for every tensor axis indexed by `group`."""
        return [
            (name, i)
            for name, axes in self.axes.items()
            for i, a in enumerate(axes)
            if a is not None and a.group == group
        ]

    @property
    def groups(self) -> list[str]:
        """Groups that index at least one tensor, in declaration order."""
        used = {a.group for axes in self.axes.values() for a in axes if a is not None}
        return [g for g in self.sizes if g in used]


def parse_groups(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """'residual,mlp' or a list of kinds -> a validated tuple (default: all kinds)."""
    if text is None:
        return GROUP_KINDS
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    bad = [s for s in items if s not in GROUP_KINDS]
    if bad or not items:
        raise AlignError(
            f"unknown permutation group(s) {', '.join(map(repr, bad)) or '(none given)'}",
            hint=f"choose from {', '.join(GROUP_KINDS)}, comma-separated",
        )
    return tuple(dict.fromkeys(items))


def _int(cfg: Mapping[str, Any], *keys: str) -> int | None:
    for k in keys:
        if isinstance(cfg.get(k), int):
            return int(cfg[k])
    return None


def transformer_spec(
    shapes: Mapping[str, tuple[int, ...]],
    config: Mapping[str, Any],
    groups: Iterable[str] = GROUP_KINDS,
) -> PermSpec:
    """The permutation spec of a decoder-only transformer checkpoint.

    `shapes` maps the stored tensor names to their shapes; `config` is config.json.
    Groups whose kind is not in `groups` are left out (they stay the identity). Raises
    AlignError for a tensor whose behaviour under permutation is not known, so that
    nothing is ever permuted inconsistently."""
    kinds = set(parse_groups(list(groups)))
    cfg = text_config(dict(config))
    model_type = family(dict(config))
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    n_q = _int(cfg, "num_attention_heads", "n_head")
    if hidden is None or n_q is None:
        raise AlignError(
            "config.json has no hidden size or head count (hidden_size / n_embd, "
            "num_attention_heads / n_head)",
            hint="alignment needs the model's config.json beside its weights",
        )
    n_kv = _int(cfg, "num_key_value_heads", "n_head_kv") or n_q
    head_dim = _int(cfg, "head_dim") or hidden // n_q
    if n_q % n_kv:
        raise AlignError(f"{n_q} attention heads do not split into {n_kv} key/value groups")
    rep = n_q // n_kv
    conv1d = model_type in _CONV1D_FAMILIES

    spec = PermSpec()
    residual = Axis("residual") if "residual" in kinds else None
    if residual:
        spec.sizes["residual"] = hidden
    q_part, kv_part = (1, head_dim), (rep, head_dim)

    def heads(layer: int, *parts: tuple[int, int]) -> Axis | None:
        if "heads" not in kinds:
            return None
        spec.sizes.setdefault(f"heads.{layer}", n_q)
        return Axis(f"heads.{layer}", parts)

    def mlp(layer: int, size: int, parts: int = 1) -> Axis | None:
        if "mlp" not in kinds:
            return None
        group = f"mlp.{layer}"
        if spec.sizes.setdefault(group, size) != size:
            raise AlignError(
                f"layer {layer}: MLP projections disagree on the hidden width "
                f"({spec.sizes[group]} vs {size})"
            )
        return Axis(group, ((1, 1),) * parts)

    def unsupported(name: str, shape: tuple[int, ...], why: str) -> AlignError:
        return AlignError(
            f"{name} {list(shape)}: {why}",
            hint="permutation matching supports Llama, Mistral, Qwen2/3, Gemma, Phi-3, "
            "GPT-2 and GPT-NeoX style decoders",
        )

    for name, shape in shapes.items():
        shape = tuple(shape)
        r = describe(name)
        role, layer = r.role, r.layer
        is_bias = name.endswith(".bias") or len(shape) == 1
        axes: tuple[Axis | None, ...]
        if role in ("embed", "pos_embed", "lm_head"):
            axes = (None, residual)
        elif role == "norm":
            if shape != (hidden,):
                raise unsupported(name, shape, f"a norm not of the hidden size {hidden}")
            axes = (residual,)
        elif layer is None and role != "other":
            raise unsupported(name, shape, f"a {role} tensor outside the decoder blocks")
        elif role in ("attn_q", "attn_k", "attn_v"):
            part = q_part if role == "attn_q" else kv_part
            axes = (heads(layer, part),) if is_bias else (heads(layer, part), residual)
        elif role == "attn_qkv":
            if conv1d:  # (hidden, 3·hidden): output columns are [q | k | v]
                out = heads(layer, q_part, q_part, q_part)
                axes = (out,) if is_bias else (residual, out)
            elif model_type == "gpt_neox":  # rows interleaved per head: [q_h k_h v_h]
                out = heads(layer, (1, 3 * head_dim))
                axes = (out,) if is_bias else (out, residual)
            elif model_type in ("phi3",):  # rows [q | k | v] with GQA
                out = heads(layer, q_part, kv_part, kv_part)
                axes = (out,) if is_bias else (out, residual)
            else:
                raise unsupported(name, shape, f"fused q/k/v layout of {model_type} unknown")
        elif role == "attn_o":
            if is_bias:
                axes = (residual,)
            elif conv1d:
                axes = (heads(layer, q_part), residual)
            else:
                axes = (residual, heads(layer, q_part))
        elif role in ("mlp_gate", "mlp_up", "mlp_gate_up"):
            parts = 2 if role == "mlp_gate_up" else 1
            if is_bias:
                axes = (mlp(layer, shape[0] // parts, parts),)
            elif conv1d:
                axes = (residual, mlp(layer, shape[1] // parts, parts))
            else:
                axes = (mlp(layer, shape[0] // parts, parts), residual)
        elif role == "mlp_down":
            if is_bias:
                axes = (residual,)
            elif conv1d:
                axes = (mlp(layer, shape[0]), residual)
            else:
                axes = (residual, mlp(layer, shape[1]))
        elif role == "qk_norm":
            if shape == (head_dim,):  # one gain shared by every head
                axes = (None,)
            elif shape[0] == n_q * head_dim:
                axes = (heads(layer, q_part),)
            elif shape[0] == n_kv * head_dim:
                axes = (heads(layer, kv_part),)
            else:
                raise unsupported(name, shape, "a q/k norm of unexpected size")
        elif name.endswith(_FEATURELESS):
            axes = (None,) * len(shape)
        else:
            raise unsupported(name, shape, "how this tensor follows a permutation is not known")
        if math.prod(shape) == 0:
            continue
        spec.add(name, shape, axes)
    return spec
