"""Steering at run time with forward hooks, inside a context manager.

Nothing in the model is modified: hooks are registered on entry and removed on exit,
whatever happens inside the `with` block.

- mode "add": each vector's direction for layer i, times its strength, is added to the
  output of decoder block i, at every position or from absolute token index `start` on
  (positions are tracked across `generate` steps through the KV cache).
- mode "ablate": the span of the directions is projected out of everything that writes
  to the residual stream, at every layer (token and position embeddings, attention and
  MLP outputs, and the input of a tied lm_head), as in Arditi et al.'s directional
  ablation. This is exactly what `weightops steer ablate` bakes into the weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from weightops.steering.layers import Layout, SteeringError, find_layers
from weightops.steering.vector import SteeringVector


def check_fits(vec: SteeringVector, layout: Layout) -> None:
    """A vector must come from the same model type and hidden size, within the depth."""
    if vec.hidden_size != layout.hidden_size:
        raise SteeringError(
            f"vector has hidden size {vec.hidden_size} but the model has {layout.hidden_size}",
            hint="extract the vector from this model (or one of the same family and size)",
        )
    if vec.model_type not in (layout.model_type, "unknown", ""):
        raise SteeringError(
            f"vector was read from a {vec.model_type} model, not {layout.model_type}",
            hint="extract the vector from this model",
        )
    bad = [i for i in vec.layers if not 0 <= i < len(layout.blocks)]
    if bad:
        raise SteeringError(
            f"vector has layers {bad} but the model has {len(layout.blocks)} (0 … {len(layout.blocks) - 1})"
        )


class _Positions:
    """Which positions of the current forward pass are at or after `start`: computed
    once per pass, as None when all of them are (every decoding step after the prompt),
    so the block hooks then add without a mask.

    The absolute index of the first token of a pass is the length of the KV cache it
    brings. transformers has renamed and dropped the keyword arguments that carry it
    (`cache_position`, `past_key_values` became `cache` in 5.24), so the cache is found by
    what it is, a `Cache` object (or the legacy tuple of per-layer (key, value) pairs),
    whatever argument it comes in.
    """

    def __init__(self, start: int) -> None:
        self.start = start
        self.mask: torch.Tensor | None = None

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        offset = _cache_length((*kwargs.values(), *args))
        positions = torch.arange(offset, offset + ids.shape[1], device=ids.device)
        keep = positions >= self.start
        self.mask = None if bool(keep.all()) else keep.view(1, -1, 1)


def _cache_length(values: Sequence[Any]) -> int:
    """Tokens already in the KV cache among a forward pass's arguments; 0 without one."""
    for v in values:
        if hasattr(v, "get_seq_length"):
            return int(v.get_seq_length())
        if (
            isinstance(v, tuple)
            and v
            and isinstance(v[0], tuple)
            and v[0]
            and torch.is_tensor(v[0][0])
            and v[0][0].dim() == 4
        ):
            return int(v[0][0].shape[-2])
    return 0


def _edit_output(output: Any, fn: Any) -> Any:
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


@contextlib.contextmanager
def steer(
    model: nn.Module,
    vectors: Sequence[tuple[SteeringVector, float]],
    *,
    mode: str = "add",
    layer: int | None = None,
    start: int = 0,
    layers_path: str | None = None,
) -> Iterator[nn.Module]:
    """Apply several (vector, strength) pairs at once; yields the (unchanged) model."""
    if mode not in ("add", "ablate"):
        raise SteeringError(f"mode must be 'add' or 'ablate' (got {mode!r})")
    if not vectors:
        raise SteeringError("no vectors to apply")
    try:
        layout = find_layers(model, layers_path)
    except SteeringError:
        # A model the rules do not know: the path recorded when the vector was read.
        if layers_path is not None or not vectors[0][0].layers_path:
            raise
        layout = find_layers(model, vectors[0][0].layers_path)
    for vec, strength in vectors:
        check_fits(vec, layout)
        if not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise SteeringError(f"strength must be a finite number (got {strength!r})")
    if start < 0:
        raise SteeringError(f"start must be >= 0 (got {start})")
    handles: list[Any] = []
    try:
        if mode == "add":
            _add_hooks(model, layout, vectors, start, handles)
        else:
            _ablate_hooks(model, layout, vectors, layer, handles)
        yield model
    finally:
        for h in handles:
            h.remove()


def _add_hooks(
    model: nn.Module,
    layout: Layout,
    vectors: Sequence[tuple[SteeringVector, float]],
    start: int,
    handles: list[Any],
) -> None:
    total: dict[int, torch.Tensor] = {}
    for vec, strength in vectors:
        for i, d in vec.directions.items():
            total[i] = total.get(i, torch.zeros_like(d)) + strength * d
    positions = _Positions(start) if start > 0 else None
    if positions is not None:
        handles.append(model.register_forward_pre_hook(positions.pre_hook, with_kwargs=True))

    def make(delta: torch.Tensor) -> Any:
        cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

        def add(h: torch.Tensor) -> torch.Tensor:
            key = (h.device, h.dtype)
            if key not in cast:
                cast[key] = delta.to(device=h.device, dtype=h.dtype)
            d = cast[key]
            if positions is None or positions.mask is None:
                return h + d
            return h + positions.mask.to(h.device) * d

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            return _edit_output(output, add)

        return hook

    for i, delta in total.items():
        # prepend: run before transformers' own hooks that record hidden states.
        handles.append(layout.blocks[i].register_forward_hook(make(delta), prepend=True))


def ablation_basis(
    vectors: Sequence[tuple[SteeringVector, float]], layer: int | None
) -> torch.Tensor:
    """Orthonormal columns spanning the directions to ablate: each vector's only
    direction, or its direction at `layer`."""
    cols = []
    for vec, _ in vectors:
        if layer is not None:
            if layer not in vec.directions:
                raise SteeringError(
                    f"the vector has no direction for layer {layer} (it has {vec.layers})"
                )
            cols.append(vec.directions[layer])
        elif len(vec.directions) == 1:
            cols.append(next(iter(vec.directions.values())))
        else:
            raise SteeringError(
                f"ablation needs one direction, but the vector has {len(vec.directions)} layers",
                hint="pass layer=N to choose one",
            )
    a = torch.stack(cols, dim=1).double()
    q, r = torch.linalg.qr(a)
    # A direction that adds (almost) nothing new leaves a tiny diagonal entry of R,
    # relative to its own length; its column of Q would be rounding noise.
    if (r.diagonal().abs() <= 1e-6 * a.norm(dim=0).clamp_min(1e-30)).any():
        raise SteeringError("an ablation direction is zero or repeats another")
    q = q.float()
    return q


def residual_writers(model: nn.Module, layout: Layout) -> tuple[list[nn.Module], nn.Module | None]:
    """Every module whose output is added to the residual stream, and the lm_head when
    it shares its weight with the input embeddings (it then reads the stream too)."""
    emb = model.get_input_embeddings()
    mods = [emb]
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    if wpe is not None:
        mods.append(wpe)
    for i in range(len(layout.blocks)):
        mods.extend(layout.writers(i))
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    return mods, head if tied else None


def _ablate_hooks(
    model: nn.Module,
    layout: Layout,
    vectors: Sequence[tuple[SteeringVector, float]],
    layer: int | None,
    handles: list[Any],
) -> None:
    q = ablation_basis(vectors, layer)

    def project(h: torch.Tensor) -> torch.Tensor:
        b = q.to(device=h.device, dtype=h.dtype)
        return h - (h @ b) @ b.T

    writers, tied_head = residual_writers(model, layout)
    for m in writers:
        handles.append(
            m.register_forward_hook(lambda mod, args, out: _edit_output(out, project), prepend=True)
        )
    if tied_head is not None:
        handles.append(
            tied_head.register_forward_pre_hook(lambda mod, args: (project(args[0]), *args[1:]))
        )
