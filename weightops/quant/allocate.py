"""Calibrated bit allocation: how many 4-bit groups per row each matrix gets.

Without calibration every matrix gets the same share of 4-bit groups (`choose_k4`).
With it, the budget is spread over the matrices where it buys the most: the plan
minimises the estimated loss increase

    Σₘ fₘ · Eₘ(k4ₘ)   subject to   Σₘ bitsₘ(k4ₘ) ≤ avg_bits · Σₘ weightsₘ,

where Eₘ(k) is matrix m's output error with k 4-bit groups per row and fₘ the loss's
mean squared gradient at its output (weightops.quant.sensitivity: fₘ·Eₘ is the
second-order loss increase). bitsₘ counts every stored bit, so the budget holds
exactly; k4ₘ keeps the alignment rule of `choose_k4` (a multiple of 4 on long rows).

Eₘ(k) is estimated from one 2-bit pass over the weights (`error_curve`): each group's
2-bit error weighted by the inputs' mean x², less the 4-bit rounding noise of its range
(the gain the quantizer itself uses to pick the 4-bit groups of a row), the k largest
gains of each row taken off. On SmolLM2-135M at 3.0 bits per weight (GPTQ's 1% damping,
unweighted Hessians), the plan from these estimates gave a held-out perplexity of 29.3,
the plan from the output errors of the GPTQ codes themselves at every k (a GPTQ run
per k) 29.7, the same share of 4-bit groups in every matrix 33.0; weighting the errors
by nothing (the later layers, with larger activations, then take the bits) gave 54.8,
and by one over each matrix's output energy 37.1.

The choice is a multiple-choice knapsack, solved exactly by dynamic programming over
the budget in units of the smallest step in bits (`allocate`).
"""

from __future__ import annotations

import math

import torch

from weightops.arch import describe
from weightops.io.checkpoint import Checkpoint
from weightops.quant.grids import CLIP_GRID, choose_grids, sq_error
from weightops.quant.mixed import QuantError, k4_step
from weightops.quant.model import part_bits

# The dynamic programme's table has this many budget units at most; finer budgets are
# counted in coarser units, each option's bits rounded up, so the budget still holds.
MAX_UNITS = 1 << 15


def options(in_features: int, group_size: int) -> list[int]:
    """The aligned 4-bit group counts a row of `in_features` may have."""
    g = in_features // group_size
    return list(range(0, g + 1, k4_step(g)))


@torch.no_grad()
def error_curve(
    weight: torch.Tensor, importance: torch.Tensor, group_size: int, ks: list[int]
) -> list[float]:
    """Estimated output error Σ h (ŵ − w)² of `weight` [out, in] with k 4-bit groups per
    row, for each k in ks; importance: h [in], the mean x² of each input."""
    out_f, in_f = weight.shape
    g = in_f // group_size
    h = importance.float().clamp_min(0).reshape(g, group_size)
    fit = weight.float().reshape(out_f, g, group_size)
    _, s, lo = choose_grids(fit, h, 0, CLIP_GRID, True)
    err2 = sq_error(fit, h, s, lo, 3)
    # A 4-bit grid over the group's range leaves about its rounding noise, step²/12.
    step = (fit.amax(-1) - fit.amin(-1)) / 15
    err4 = step.square_().mul_(h.sum(-1) / 12)
    gains = (err2 - err4).clamp_min_(0).sort(dim=1, descending=True).values
    taken = torch.cat([gains.new_zeros(1), gains.double().sum(0).cumsum(0)])
    total = float(err2.double().sum())
    return [total - float(taken[k]) for k in ks]


def allocate(choices: list[list[tuple[int, float]]], budget: int) -> list[int]:
    """For each item, the index of one of its (bits, cost) choices, with the least total
    cost whose total bits stay within `budget`. Every item's first choice must be its
    cheapest in bits."""
    if not choices:
        return []
    base = [c[0][0] for c in choices]
    if any(b < base[i] for i, c in enumerate(choices) for b, _ in c):
        raise ValueError("each item's first choice must have its fewest bits")
    spare = budget - sum(base)
    if spare < 0:
        raise QuantError(f"{budget} bits cannot hold the matrices even with no 4-bit groups")
    extras = [[b - base[i] for b, _ in c] for i, c in enumerate(choices)]
    unit = math.gcd(*(e for row in extras for e in row)) or 1
    unit = max(unit, math.ceil(spare / MAX_UNITS))
    capacity = spare // unit
    best = torch.zeros(capacity + 1, dtype=torch.float64)  # least cost within c units
    picks = []
    for row, c in zip(extras, choices, strict=True):
        new = torch.full_like(best, math.inf)
        pick = torch.zeros(capacity + 1, dtype=torch.int32)
        for j, (extra, (_, cost)) in enumerate(zip(row, c, strict=True)):
            units = -(-extra // unit)
            if units > capacity:
                continue
            cand = best[: capacity + 1 - units] + cost
            better = cand < new[units:]
            new[units:] = torch.where(better, cand, new[units:])
            pick[units:] = torch.where(better, j, pick[units:])
        best = new
        picks.append((pick, [-(-e // unit) for e in row]))
    out = []
    left = capacity
    for pick, units in reversed(picks):
        j = int(pick[left])
        out.append(j)
        left -= units[j]
    return out[::-1]


def calibrated_plan(
    ckpt: Checkpoint,
    texts: list[str],
    plan: dict[str, tuple[int, int]],
    group_size: int,
    avg_bits: float,
) -> tuple[dict[str, tuple[int, int]], dict[str, list[torch.Tensor]]]:
    """`plan` (weight name -> (4-bit groups, outliers per row)) with the 4-bit group
    counts of the block linears re-chosen from the calibration (module doc) within
    avg_bits per weight over all of `plan`, the others keeping theirs; and the per-token
    weights of the block linears' Hessians (weightops.quant.sensitivity)."""
    from weightops.quant.sensitivity import measure

    shapes = {n: tuple(ckpt.tensors[n].shape) for n in plan}
    curves: dict[str, list[float]] = {}

    def on_layer(weights: dict[str, torch.Tensor], importance: dict[str, torch.Tensor]) -> None:
        for name, w in weights.items():
            curves[name] = error_curve(
                w, importance[name], group_size, options(w.shape[1], group_size)
            )

    blocks = {n for n in plan if describe(n).layer is not None}
    sens = measure(ckpt, texts, blocks, on_layer)
    free = sorted(n for n in blocks if n in curves and n in sens.cost)
    weights = sum(math.prod(s) for s in shapes.values())
    fixed = sum(part_bits(shapes[n], group_size, *plan[n]) for n in plan if n not in free)
    choices = [
        [
            (part_bits(shapes[n], group_size, k, plan[n][1]), sens.cost[n] * err)
            for k, err in zip(options(shapes[n][1], group_size), curves[n], strict=True)
        ]
        for n in free
    ]
    picks = allocate(choices, math.floor(avg_bits * weights) - fixed)
    new = dict(plan)
    for name, j in zip(free, picks, strict=True):
        new[name] = (options(shapes[name][1], group_size)[j], plan[name][1])
    return new, sens.token_weights
