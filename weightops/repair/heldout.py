"""The held-out side of restoration's settings search (`weightops.repair.search`):
how the examples are split, what a measured point is, and which point is kept.

- `split` cuts the examples in a fit half and a held-out half, by a seeded draw;
  with a key, examples of equal key stay on one side (`same_request` for harmful
  examples: the same harmful answer).
- A `Candidate` is one checkpoint of a trajectory with its held-out harmful rate and
  task score (pooled over both halves when the search cross-fits,
  `weightops.repair.crossfit`); `pareto_front` and `choose` compare them (`choose` is
  the search's rule).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Candidate:
    """One point of a trajectory, measured on held-out data."""

    layers: int
    step: int
    rollback: bool
    harmful: float
    task: float
    restored: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "step": self.step,
            "rollback": self.rollback,
            "harmful_rate": round(self.harmful, 4),
            "task": round(self.task, 4),
            "restored": self.restored,
        }


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats on one of (harmful rate ↓, task ↑) without losing
    on the other, by harmful rate then task; of equal points, the fewest restored."""
    best: dict[tuple[float, float], Candidate] = {}
    for c in candidates:
        key = (c.harmful, c.task)
        if key not in best or c.restored < best[key].restored:
            best[key] = c
    points = sorted(best.values(), key=lambda c: (c.harmful, -c.task))
    front: list[Candidate] = []
    for c in points:
        if not front or c.task > front[-1].task:
            front.append(c)
    return front


def choose(candidates: Sequence[Candidate], threshold: float) -> Candidate:
    """The lowest harmful rate among candidates at or above the task threshold (ties:
    higher task, then fewer restored weights); with none, the highest task score."""
    ok = [c for c in candidates if c.task >= threshold]
    if not ok:
        return max(candidates, key=lambda c: (c.task, -c.harmful, -c.restored))
    return min(ok, key=lambda c: (c.harmful, -c.task, c.restored))


def split(
    examples: Sequence[Any], seed: int, key: Callable[[Any], str] | None = None
) -> tuple[list[Any], list[Any]]:
    """(fit, held out): a seeded shuffle cut in half (the held-out half gets the odd one).

    With `key`, examples of equal key stay on one side: the groups are shuffled and the
    fit half takes whole groups until it holds half of the examples. When the groups
    are too few for that (either side under a third), the plain cut is used."""
    order = list(examples)
    half = len(order) // 2
    if key is not None:
        groups: dict[str, list[Any]] = {}
        for ex in order:
            groups.setdefault(key(ex), []).append(ex)
        chunks = list(groups.values())
        random.Random(seed).shuffle(chunks)
        fit: list[Any] = []
        out: list[Any] = []
        for chunk in chunks:
            (fit if len(fit) < half else out).extend(chunk)
        if 3 * min(len(fit), len(out)) >= len(order):
            return fit, out
    random.Random(seed).shuffle(order)
    return order[:half], order[half:]


def same_request(ex: Any) -> str:
    """The key that keeps harmful examples with the same harmful answer on one side of
    the split: prompts that ask for the same thing in other words would otherwise be
    held out from a fit half that already restored the refusal of that very request."""
    return " ".join((ex.response or ex.prompt).lower().split())
