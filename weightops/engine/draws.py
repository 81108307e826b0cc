"""Random draws of row blocks: generators positioned so that every block of a random
method draws exactly the numbers the whole tensor would.

A method declaring `draws=` (weightops.merge.registry) draws, for a whole tensor, one
number per entry of each drawing input, in row-major order, one input after another,
all from one generator seeded from the recipe's seed and the tensor's name. torch's
CPU generator (a Mersenne Twister) hands out numbers strictly in order, one per entry
of a float tensor and two per entry of a double one, so r₁ rows and then r₂ rows draw
what r₁ + r₂ rows draw at once; it cannot jump ahead, though. At a tensor's first
block the generator is therefore copied once per drawing input, each copy advanced
past the draws of the inputs before it by drawing them into a small scratch buffer;
each copy then draws its own input's blocks in row order. The price is (drawing
inputs − 1) × n numbers drawn and thrown away per tensor of n entries, and one scratch
buffer of memory. A GPU's generator assigns numbers to entries by thread, not in
order, so there random methods keep their tensors whole (`Plan.draws_in_blocks`).
"""

from __future__ import annotations

import torch

from weightops.engine.plan import Plan
from weightops.engine.stream import Piece

# Numbers thrown away per call while advancing a generator: large enough that the
# per-call overhead vanishes, small enough to stay in cache.
_SCRATCH = 1 << 16


def advance(generator: torch.Generator, count: int, dtype: torch.dtype) -> None:
    """Move `generator` past the numbers `count` entries of `dtype` would draw."""
    scratch = torch.empty(min(count, _SCRATCH), dtype=dtype, device=generator.device)
    while count > 0:
        k = min(count, scratch.numel())
        torch.rand(k, generator=generator, dtype=dtype, device=generator.device, out=scratch[:k])
        count -= k


def positioned(
    seed: int, drawing: list[bool], numel: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Generator | None]:
    """One generator per input, at the first draw of that input's part of a whole
    tensor's stream (None for an input that draws nothing)."""
    stream = torch.Generator(device=device)
    stream.manual_seed(seed)
    last = max((i for i, d in enumerate(drawing) if d), default=-1)
    generators: list[torch.Generator | None] = []
    for i, draws in enumerate(drawing):
        if not draws:
            generators.append(None)
            continue
        own = torch.Generator(device=device)
        own.set_state(stream.get_state())
        generators.append(own)
        if i < last:
            advance(stream, numel, dtype)
    return generators


class BlockDraws:
    """The generators of each piece, in the order the pieces are computed: a fresh
    seeded one for a whole tensor, positioned ones carried from block to block."""

    def __init__(self, plan: Plan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self._task = ""
        self._generators: list[torch.Generator | None] = []

    def for_piece(
        self, piece: Piece, dtype: torch.dtype
    ) -> torch.Generator | list[torch.Generator | None] | None:
        """The `rng` for `piece`, whose inputs are in `dtype`. Pieces of a tensor must
        come in row order, each tensor's in one run."""
        task = piece.task
        if task.seed is None:
            return None
        drawing = self.plan.drawing_inputs(task) if piece.rows is not None else None
        if drawing is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(task.seed)
            return generator
        if piece.rows[0] == 0:
            self._task = task.name
            self._generators = positioned(task.seed, drawing, task.numel, dtype, self.device)
        elif self._task != task.name:
            raise RuntimeError(f"{task.name}: row blocks computed out of order")
        return self._generators
