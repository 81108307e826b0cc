"""Weight matching (Ainsworth et al., Git Re-Basin, 2023), streamed tensor by tensor.

For models A (the reference) and B, find permutations π of B's groups maximizing the
objective Σ_W ⟨W_A, π(W_B)⟩ over every tensor W. It is a sum of linear assignment
problems that share variables, solved by coordinate ascent: take the groups in a
seeded random order and, for each, fix the others and solve for it exactly. With every
other axis of W_B permuted, the group's score matrix is

    S[i, j] = Σ over the axes of W indexed by the group of ⟨unit i of W_A, unit j of W_B⟩

and the best permutation maximizes Σᵢ S[i, π(i)] (`kernels.linear_assignment`). A step
is kept only when it raises the objective, so the objective never decreases; rounds
repeat until no group improves (or `max_rounds`).

Heads under GQA are solved exactly as a two-level assignment: for every pair of
key/value groups (a in A, b in B) the best matching of their query heads, plus the
key/value score of (a, b), is one entry of a small assignment over the groups.

Each score matrix is accumulated from one tensor of each model at a time, read from
disk when needed: memory holds two tensors and the score matrices, never a model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from weightops import kernels
from weightops.align.groups import AlignError, Axis, PermSpec
from weightops.engine.progress import Progress
from weightops.io.checkpoint import Checkpoint
from weightops.io.safetensors_file import FileReader


class TensorSource(Protocol):
    """Named tensors read one at a time."""

    names: list[str]

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> torch.Tensor: ...


class CheckpointSource:
    """A checkpoint's floating-point tensors, each read from disk on every request."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.names = [n for n, i in ckpt.tensors.items() if i.dtype.is_floating_point]
        self.reader = FileReader()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.tensors[name].shape

    def read(self, name: str) -> torch.Tensor:
        return self.reader.read(self.ckpt.tensors[name])

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DictSource:
    """Tensors held in memory (small models, tests, experiments)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)
        self.names = list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def axis_index(axis: Axis, perm: torch.Tensor) -> torch.Tensor:
    """The gather index along an axis of `axis`'s layout for the group permutation `perm`
    (new unit i is old unit perm[i])."""
    n = perm.numel()
    pieces, offset = [], 0
    for stride, block in axis.parts:
        units = perm[::stride] // stride
        within = torch.arange(block, device=perm.device)
        pieces.append(offset + (units[:, None] * block + within).reshape(-1))
        offset += n // stride * block
    return torch.cat(pieces)


def permute(
    tensor: torch.Tensor,
    axes: tuple[Axis | None, ...],
    perms: Mapping[str, torch.Tensor],
    *,
    skip: int | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """`tensor` with each axis reordered by its group's permutation (groups missing from
    `perms` stay as they are). `skip` leaves one axis alone; `rows` says the tensor is
    rows [r0, r1) of the full one, which is only possible when axis 0 is not permuted."""
    for dim, axis in enumerate(axes):
        if axis is None or dim == skip or axis.group not in perms:
            continue
        if dim == 0 and rows is not None:
            raise ValueError("a row block of a tensor whose rows are permuted")
        idx = axis_index(axis, perms[axis.group].to(tensor.device))
        tensor = tensor.index_select(dim, idx)
    return tensor


def _units(t: torch.Tensor, dim: int, axis: Axis, n: int) -> Iterable[tuple[int, torch.Tensor]]:
    """(stride, matrix with one row per unit of the part) for each part of the axis."""
    t = t.movedim(dim, 0)
    offset = 0
    for stride, block in axis.parts:
        units = n // stride
        yield stride, t[offset : offset + units * block].reshape(units, -1)
        offset += units * block


def _solve(scores: dict[int, torch.Tensor], n: int) -> torch.Tensor:
    strides = sorted(scores)
    r = strides[-1]
    if r == 1:
        return kernels.linear_assignment(scores[1])
    if strides not in ([r], [1, r]):
        raise AlignError(f"a group mixes unit strides {strides}; only 1 and one other work")
    inner_scores = scores.get(1, torch.zeros(n, n, dtype=torch.float64))
    m = n // r
    outer = torch.empty(m, m, dtype=torch.float64)
    inner: dict[tuple[int, int], torch.Tensor] = {}
    arange = torch.arange(r)
    for a in range(m):
        for b in range(m):
            sub = inner_scores[a * r : (a + 1) * r, b * r : (b + 1) * r]
            sigma = kernels.linear_assignment(sub)
            inner[a, b] = sigma
            outer[a, b] = sub[arange, sigma].sum() + scores[r][a, b]
    pi = kernels.linear_assignment(outer)
    return torch.cat([int(pi[a]) * r + inner[a, int(pi[a])] for a in range(m)])


def _value(scores: dict[int, torch.Tensor], perm: torch.Tensor) -> float:
    total = 0.0
    for stride, s in scores.items():
        units = perm[::stride] // stride
        total += float(s[torch.arange(units.numel()), units].sum())
    return total


@dataclass
class MatchResult:
    """Permutations of the model's groups, and how well it matches the reference."""

    perms: dict[str, torch.Tensor]
    objective_before: float
    objective_after: float
    reference_sq: float  # Σ ‖W_A‖²
    model_sq: float  # Σ ‖W_B‖²
    rounds: int
    converged: bool
    # The objective after each round (entry 0: before any), as tracked by the steps.
    history: list[float] = field(default_factory=list)

    def distance(self, objective: float) -> float:
        """‖A − π(B)‖ / ‖A‖ for the objective ⟨A, π(B)⟩ of some π."""
        sq = max(self.reference_sq + self.model_sq - 2 * objective, 0.0)
        return (sq / self.reference_sq) ** 0.5 if self.reference_sq else 0.0

    def cosine(self, objective: float) -> float:
        denom = (self.reference_sq * self.model_sq) ** 0.5
        return objective / denom if denom else 0.0

    @property
    def moved(self) -> dict[str, int]:
        """Units each group moved (0 for the identity)."""
        return {g: int((p != torch.arange(p.numel())).sum().item()) for g, p in self.perms.items()}


def weight_matching(
    spec: PermSpec,
    reference: TensorSource,
    model: TensorSource,
    *,
    seed: int = 0,
    max_rounds: int = 100,
    progress: bool | None = False,
    label: str = "align",
    device: torch.device | str = "cpu",
    on_round: Callable[[int, float], None] | None = None,
) -> MatchResult:
    """Permutations of `model`'s groups (see `spec`) that best match `reference`.

    Both sources must hold the same names with the same shapes. The objective covers
    every tensor of `reference.names`; only the spec's tensors can change it."""
    if max_rounds < 1:
        raise AlignError(f"max_rounds must be at least 1 (got {max_rounds})")
    groups = spec.groups
    perms = {g: torch.arange(spec.sizes[g]) for g in groups}
    dev = torch.device(device)

    def nbytes(name: str) -> int:
        # Both models' copies, as float32.
        return 8 * math.prod(reference.shape(name))

    def pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            reference.read(name).to(dev, torch.float32),
            model.read(name).to(dev, torch.float32),
        )

    def totals() -> tuple[float, float, float]:
        obj = ref_sq = model_sq = 0.0
        bar = Progress(
            len(reference.names),
            sum(map(nbytes, reference.names)),
            f"{label} objective",
            enabled=progress,
        )
        for name in reference.names:
            a, b = pair(name)
            axes = spec.axes.get(name)
            if axes is not None:
                b = permute(b, axes, perms)
            obj += float(kernels.matmul(a.reshape(1, -1), b.reshape(-1, 1), dtype=torch.float64))
            ref_sq += float(a.double().square().sum())
            model_sq += float(b.double().square().sum())
            bar.update(nbytes(name), name)
        bar.close()
        return obj, ref_sq, model_sq

    def scores(group: str, bar: Progress) -> dict[int, torch.Tensor]:
        n = spec.sizes[group]
        out: dict[int, torch.Tensor] = {}
        for name, dim in spec.touching(group):
            axes = spec.axes[name]
            a, b = pair(name)
            b = permute(b, axes, perms, skip=dim)
            for (stride, ua), (_, ub) in zip(
                _units(a, dim, axes[dim], n), _units(b, dim, axes[dim], n), strict=True
            ):
                s = kernels.matmul(ua, ub.T).to("cpu", torch.float64)
                out[stride] = out[stride] + s if stride in out else s
            bar.update(nbytes(name), name)
        return out

    objective, ref_sq, model_sq = totals()
    before = objective
    history = [objective]
    # Gains below this are rounding noise between equally good permutations.
    tol = 1e-7 * max((ref_sq * model_sq) ** 0.5, 1e-30)
    order = random.Random(seed)
    rounds, converged = 0, False
    touched = [name for g in groups for name, _ in spec.touching(g)]
    steps, step_bytes = len(touched), sum(map(nbytes, touched))
    while rounds < max_rounds and groups:
        rounds += 1
        improved = False
        shuffled = list(groups)
        order.shuffle(shuffled)
        bar = Progress(steps, step_bytes, f"{label} round {rounds}", enabled=progress)
        for g in shuffled:
            s = scores(g, bar)
            new = _solve(s, spec.sizes[g])
            gain = _value(s, new) - _value(s, perms[g])
            if gain > tol and not torch.equal(new, perms[g]):
                perms[g] = new
                objective += gain
                improved = True
        bar.close()
        history.append(objective)
        if on_round is not None:
            on_round(rounds, objective)
        if not improved:
            converged = True
            break
    if not groups:
        converged = True
    after, _, _ = totals()
    return MatchResult(
        perms=perms,
        objective_before=before,
        objective_after=after,
        reference_sq=ref_sq,
        model_sq=model_sq,
        rounds=rounds,
        converged=converged,
        history=history,
    )


@dataclass
class Alignment:
    """Permutations to apply to one model's tensors by name."""

    spec: PermSpec
    perms: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        # Identity permutations cost a copy each and change nothing.
        self.perms = {
            g: p for g, p in self.perms.items() if not torch.equal(p, torch.arange(p.numel()))
        }

    def touches(self, name: str) -> bool:
        axes = self.spec.axes.get(name)
        return axes is not None and any(a is not None and a.group in self.perms for a in axes)

    def permutes_rows(self, name: str) -> bool:
        axes = self.spec.axes.get(name)
        return bool(axes) and axes[0] is not None and axes[0].group in self.perms

    def apply(
        self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The tensor `name` (or rows [r0, r1) of it) of the aligned model."""
        if not self.touches(name):
            return tensor
        return permute(tensor, self.spec.axes[name], self.perms, rows=rows)
