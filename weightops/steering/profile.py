"""An intervention with a shape over depth: what `steer optimize` searches.

A point of the search says

- where the direction comes from: `source`, a fractional layer (the unit directions of
  blocks ⌊s⌋ and ⌊s⌋ + 1 blended linearly and renormalised), or None for "each layer
  its own direction";
- whether each direction is first made orthogonal to the harmless prompts' mean state
  at its layer (`project`), so that removing it leaves the component those prompts
  share alone;
- a weight over depth for each residual writer kind, attention output (`attn`) and MLP
  output (`mlp`): a `Profile` that peaks at one layer and falls off linearly.

Directions are difference-of-means: the mean block output at the last prompt token of
the target prompts (e.g. harmful) minus that of the harmless prompts, per layer.

mode "remove" (directional ablation with a weight): every writer W of block i becomes
W − λᵢ r̂ r̂ᵀ W, λ = 1 being the full projection of Arditi et al.; λ > 1 overshoots.
With `norms`, the edit keeps each output row's norm (the norm-preserving ablation of
grimjim's "norm-preserving biprojected abliteration", which heretic-llm approximates
with a rank-3 LoRA; here it is exact): the rows of W are normalised, the direction is
removed from them with weight λ, and each row is scaled back to its original norm.
The residual stream then keeps the magnitudes the later blocks were trained on.
mode "add": block i's output gets λᵢ · ‖μ⁺ − μ⁻‖ · r̂ added at every position (the
`mlp` profile; attention has no separate place to add to), so λ = 1 adds one whole
mean difference, scaled at the direction's own layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from weightops.steering.layers import POST_NORM_FAMILIES, SteeringError, find_layers
from weightops.steering.vector import SteeringVector

MODES = ("remove", "add")
COMPONENTS = ("attn", "mlp")


@dataclass(frozen=True)
class Profile:
    """A weight over depth: `peak` at layer `position`, falling linearly to
    `floor × peak` at `width` layers away, zero beyond."""

    peak: float
    position: float
    floor: float
    width: float

    def weight(self, layer: int) -> float:
        distance = abs(layer - self.position)
        if distance > self.width:
            return 0.0
        return self.peak * (1.0 - (distance / self.width) * (1.0 - self.floor))


@dataclass(frozen=True)
class Point:
    """One intervention: direction source, projection choice and per-writer profiles."""

    mode: str
    source: float | None
    project: bool
    attn: Profile
    mlp: Profile
    norms: bool = False  # remove mode: keep each writer row's norm

    def weights(self, depth: int) -> dict[tuple[int, str], float]:
        """{(layer, component): weight} for every nonzero weight."""
        comps = COMPONENTS if self.mode == "remove" else ("mlp",)
        out = {}
        for c in comps:
            prof: Profile = getattr(self, c)
            for i in range(depth):
                w = prof.weight(i)
                if w != 0.0:
                    out[(i, c)] = w
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        return cls(
            mode=d["mode"],
            source=d["source"],
            project=bool(d["project"]),
            attn=Profile(**d["attn"]),
            mlp=Profile(**d["mlp"]),
            norms=bool(d.get("norms", False)),
        )


@dataclass
class Directions:
    """Per-layer mean states of the target and harmless prompts ([depth, hidden] each)."""

    target_mean: torch.Tensor
    harmless_mean: torch.Tensor

    @property
    def depth(self) -> int:
        return self.target_mean.shape[0]

    def unit(self, project: bool) -> torch.Tensor:
        """[depth, hidden] unit difference-of-means directions."""
        diff = (self.target_mean - self.harmless_mean).double()
        r = diff / diff.norm(dim=1, keepdim=True).clamp_min(1e-30)
        if project:
            g = self.harmless_mean.double()
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
            r = r - (r * g).sum(1, keepdim=True) * g
            r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return r

    def for_point(self, point: Point) -> dict[int, torch.Tensor]:
        """{layer: direction} the point uses at each layer it touches: unit for
        removal, scaled by the mean difference's norm for addition."""
        r = self.unit(point.project)
        norms = (self.target_mean - self.harmless_mean).double().norm(dim=1)
        layers = sorted({i for i, _ in point.weights(self.depth)})
        if point.source is None:
            picked = {i: (r[i], norms[i]) for i in layers}
        else:
            if not 0 <= point.source <= self.depth - 1:
                raise SteeringError(
                    f"direction source layer {point.source} is outside 0 … {self.depth - 1}"
                )
            lo = min(math.floor(point.source), self.depth - 1)
            hi = min(lo + 1, self.depth - 1)
            t = point.source - lo
            blend = torch.lerp(r[lo], r[hi], t)
            d = blend / blend.norm().clamp_min(1e-30)
            n = torch.lerp(norms[lo], norms[hi], t)
            picked = {i: (d, n) for i in layers}
        if point.mode == "remove":
            return {i: d.float() for i, (d, _) in picked.items()}
        return {i: (d * n).float() for i, (d, n) in picked.items()}


def check_family(model: nn.Module) -> None:
    layout = find_layers(model)
    if layout.model_type in POST_NORM_FAMILIES:
        raise SteeringError(
            f"{layout.model_type} normalises each sublayer's output before the residual "
            "stream, so a writer's weights do not set what reaches it",
            hint="optimize a model of another family, or steer it with hooks by hand",
        )


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2's Conv1D stores (in, out); Linear stores (out, in).
    return type(module).__name__ == "Conv1D"


def ablate(
    t: torch.Tensor, r: torch.Tensor, lam: float, *, rows_out: bool, keep_norms: bool = False
) -> torch.Tensor:
    """t with λ times its component along unit r removed from its output axis: the
    first axis of a Linear weight, the last of a bias or of a Conv1D weight
    (`rows_out`). With `keep_norms` a weight's rows along the output axis are
    normalised before and scaled back to their norms after (a bias is edited plainly:
    it has no rows). Computed in float64; the caller rounds."""
    x, r = t.double(), r.double()
    if x.dim() == 1:
        return x - lam * (x @ r) * r
    if keep_norms:
        rows = x.T if rows_out else x
        norms = rows.norm(dim=1, keepdim=True)
        unit = rows / norms.clamp_min(1e-300)
        edited = unit - lam * torch.outer(r, r @ unit)
        edited = edited / edited.norm(dim=1, keepdim=True).clamp_min(1e-300) * norms
        return edited.T if rows_out else edited
    if rows_out:
        return x - lam * torch.outer(x @ r, r)
    return x - lam * torch.outer(r, r @ x)


@contextlib.contextmanager
def applied(model: nn.Module, point: Point, directions: Directions) -> Iterator[nn.Module]:
    """The model with the point's intervention in effect inside the block: removal
    edits the writers' weights in place and restores them on exit; addition uses hooks."""
    depth = directions.depth
    dirs = directions.for_point(point)
    weights = point.weights(depth)
    if point.mode == "add":
        layout = find_layers(model)
        vec = SteeringVector(
            {i: weights[(i, "mlp")] * dirs[i] for i, _ in weights},
            model_type=layout.model_type,
            hidden_size=layout.hidden_size,
            method="optimize",
        )
        with vec.apply(model, strength=1.0):
            yield model
        return
    layout = find_layers(model)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for (i, comp), lam in weights.items():
                module = layout.writers(i)[COMPONENTS.index(comp)]
                r = dirs[i].to(device=module.weight.device, dtype=torch.float32)
                for p in (module.weight, getattr(module, "bias", None)):
                    if p is None:
                        continue
                    saved.append((p, p.detach().clone()))
                    edited = ablate(
                        p.detach(), r, lam, rows_out=_is_conv1d(module), keep_norms=point.norms
                    )
                    p.copy_(edited.to(p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for p, orig in saved:
                p.copy_(orig)
