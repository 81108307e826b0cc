"""Restoring weights by the aligned model's own answers: the objective the automatic
search of `weightops repair restore` uses by default.

The paper's restoration (`weightops.repair.restore`) moves one hidden state, the
state at a harmful prompt's last token, towards the aligned model's. That state
decides the first token of the answer, and nothing else: on a fine-tune that has lost
the refusal altogether, the restored model starts its refusal and then falls back to
the harmful answer or to broken text (docs/repair.md shows `Re. MiRe.`). Here the
objective is the whole refusal instead:

- The targets are the aligned model's greedy answers to the harmful prompts (its
  refusals: nobody has to write them), teacher-forced: L_r = mean negative
  log-likelihood of those answers' tokens under the current model. L_t is the same
  for the task examples' responses.
- A step restores, of the weights of every decoder block (norms excluded, as in the
  paper) not restored yet, the k with the largest first-order gain
  score = g_r ⊙ (W − W_aligned) + task_weight · min(0, g_t ⊙ (W − W_aligned)),
  g_r, g_t the gradients of L_r and L_t at the current model: setting W back to
  W_aligned changes L_r by about −g_r ⊙ (W − W_aligned), so a positive first term is
  the refusal loss it removes, and the second charges what it would add to the task
  loss. Only weights with a positive score are taken; k = fraction × pool, at least 1.
- Gradients are recomputed every step, so the task term sees the damage of the
  previous steps (at the fine-tune g_t is near zero, the task being learnt).
- Agreement across requests (`groups`, one key per answer: the request it answers).
  A weight can raise the likelihood of the refusals of a few requests a lot and do
  nothing or harm for the others; restored, it brings back the refusal of those
  requests only. With groups, g_r is taken per group and the first term becomes
  mean gain × max(0, (groups it helps − groups it harms) / groups), so a weight is
  taken only when most requests gain from it, in the spirit of the AND-mask of
  Parascandolo et al. (ICLR 2021, "Learning explanations that are hard to vary").
  On *digits* (docs/repair.md, all blocks, steps 16 to 28) it took the test harmful
  rate from 13–26 % to 2–16 % along the same trajectory, the task kept. Cost: the
  same batched passes over the answers as without groups, each group's weight
  gradients taken layer by layer from them, and three more pool-sized buffers
  (`weightops.repair.agreement`).
- Rollback (`rollback_fraction` > 0, the paper's rule): after a step, the task
  gradient is taken at the restored model, and the `rollback_fraction` of the step's
  weights whose return to the fine-tuned value most lowers the task loss (first order:
  −g_t ⊙ (W_finetuned − W_aligned), where positive) go back to it for good. The score
  before the step adds up weights as if each moved alone; this sees what they did
  together. The next step reuses that gradient, so rollback costs no extra pass.

`restore_answers` runs `steps` steps and calls `on_checkpoint(step)` after every
`checkpoint_every`-th; the callback returns False to stop early. `restored_at[name]`
records the step each weight was restored in (0: never, −1: rolled back), so any step
of the run can be rebuilt (`masks_at`).

Memory: both models, gradients of the decoder blocks, an int16 step per weight of
the pool, the step's scores as one float32 vector of the pool, with rollback a copy
of the pool's fine-tuned values, and with groups the mean gradient, the votes (int16)
and the restoring move's sign (int8). Cost per step: one forward and backward pass over the
harmful prompts with the aligned answers and one over the task examples.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn

from weightops.arch import describe
from weightops.repair.agreement import agreed_grads, nll_grads
from weightops.repair.data import Example, RepairError
from weightops.repair.evaluate import generate

_NORM_ROLES = ("norm", "qk_norm")


def block_pool(model: nn.Module, layers: int | None = None) -> dict[str, nn.Parameter]:
    """Parameters of the decoder blocks (the first `layers`, default all), norms excluded."""
    out = {}
    for name, p in model.named_parameters():
        role = describe(name)
        if role.layer is None or role.role in _NORM_ROLES:
            continue
        if layers is None or role.layer < layers:
            out[name] = p
    return out


def aligned_answers(
    aligned_model: nn.Module, tokenizer: Any, harmful: Sequence[Example], batch_size: int = 8
) -> list[Example]:
    """The harmful prompts, each with the aligned model's greedy answer as its response
    (prompts it answers with nothing are left out)."""
    said = generate(aligned_model, tokenizer, harmful, batch_size=batch_size)
    return [Example(ex.prompt, a) for ex, a in zip(harmful, said, strict=True) if a.strip()]


def masks_at(restored_at: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """Per tensor, the weights that hold their aligned value after `step` steps."""
    return {n: (w > 0) & (w <= step) for n, w in restored_at.items()}


def _roll_back(
    pool: dict[str, nn.Parameter], original: dict[str, torch.Tensor],
    g_t: dict[str, torch.Tensor], when: dict[str, torch.Tensor], step: int, share: float,
) -> None:  # fmt: skip
    """Return to their fine-tuned values the `share` of the weights restored in `step`
    whose return most lowers the task loss at the current model (first order:
    g_t ⊙ (W_finetuned − W), negative), and bar them from later steps (step −1)."""
    names = list(pool)
    flat = torch.empty(sum(p.numel() for p in pool.values()))
    offset = 0
    for n in names:
        g = -(g_t[n] * (original[n] - pool[n].detach()))
        g[(when[n] != step).to(g.device)] = 0
        flat[offset : offset + g.numel()] = g.view(-1)
        offset += g.numel()
    count = round(share * int(sum(int(torch.count_nonzero(when[n] == step)) for n in names)))
    if count:
        _set(pool, names, _largest_positive(flat, count), original, when, -1)


def _largest_positive(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest positive entries of `flat` (all of them when fewer are
    positive), as torch.topk would choose them. torch.topk over the whole pool (10⁸
    scores) is slow; here it ranks only the entries at or above a threshold read from
    a strided sample, set to hold about twice k, and falls back to every positive entry
    when the threshold lets fewer than k through."""
    n = flat.numel()
    sample = flat[:: max(1, n // (1 << 20))]
    rank = min(len(sample), max(64, 2 * k * len(sample) // n))
    cut = float(torch.topk(sample, rank).values[-1])
    chosen = (flat >= cut).nonzero().squeeze(1) if cut > 0 else torch.empty(0, dtype=torch.long)
    if len(chosen) < k:
        chosen = (flat > 0).nonzero().squeeze(1)
    if len(chosen) <= k:
        return chosen
    return chosen[torch.topk(flat[chosen], k).indices]


def _set(
    pool: dict[str, nn.Parameter], names: list[str], chosen: torch.Tensor,
    source: dict[str, torch.Tensor], when: dict[str, torch.Tensor], mark: int,
) -> None:  # fmt: skip
    """Give the weights at `chosen` (indices into the pool's tensors in `names` order,
    flattened and joined) their values in `source`; mark them."""
    bounds = torch.tensor([0, *[pool[n].numel() for n in names]]).cumsum(0)
    with torch.no_grad():
        for i, n in enumerate(names):
            idx = chosen[(chosen >= bounds[i]) & (chosen < bounds[i + 1])] - bounds[i]
            if len(idx):
                dev = idx.to(pool[n].device)
                pool[n].view(-1)[dev] = source[n].reshape(-1)[dev]
                when[n].view(-1)[idx] = mark


def restore_answers(
    finetuned_model: nn.Module,
    aligned_model: nn.Module,
    tokenizer: Any,
    answers: Sequence[Example],
    task: Sequence[Example],
    *,
    fraction: float = 0.002,
    steps: int = 40,
    layers: int | None = None,
    task_weight: float = 1.0,
    rollback_fraction: float = 0.0,
    checkpoint_every: int = 2,
    on_checkpoint: Callable[[int], bool] | None = None,
    batch_size: int = 8,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the steps on `finetuned_model` (edited in place; see the module docstring);
    `answers` are harmful prompts with the aligned model's answers (`aligned_answers`),
    `groups` (optional, one per answer) the request each answers, for the agreement
    rule. Returns restored_at; the model is left at the last step run."""
    if not 0 < fraction <= 1:
        raise RepairError(f"fraction must be in (0, 1] (got {fraction})")
    if not 0 <= rollback_fraction < 1:
        raise RepairError(f"rollback_fraction must be in [0, 1) (got {rollback_fraction})")
    if steps < 1 or checkpoint_every < 1:
        raise RepairError("steps and checkpoint_every must be at least 1")
    if not answers or not task:
        raise RepairError("restoration by answers needs harmful prompts and task examples")
    if groups is not None and len(groups) != len(answers):
        raise RepairError(
            f"groups: {len(groups)} keys for {len(answers)} answers; give one per answer"
        )
    by_group: dict[Hashable, list[Example]] = {}
    for key, ex in zip(groups or (), answers, strict=False):
        by_group.setdefault(key, []).append(ex)
    pool = block_pool(finetuned_model, layers)
    ref = dict(aligned_model.named_parameters())
    for n, p in pool.items():
        if n not in ref or ref[n].shape != p.shape:
            raise RepairError(
                f"tensor {n!r} is missing from the aligned model or has another shape",
                hint="both models must come from the same base",
            )
    aligned = {n: ref[n].detach().to(p.device, p.dtype) for n, p in pool.items()}
    when = {n: torch.zeros(p.shape, dtype=torch.int16) for n, p in pool.items()}
    original = {n: p.detach().clone() for n, p in pool.items()} if rollback_fraction else {}
    k = max(1, round(fraction * sum(p.numel() for p in pool.values())))
    flags = {n: p.requires_grad for n, p in finetuned_model.named_parameters()}
    was_training = finetuned_model.training
    finetuned_model.eval()
    try:
        for p in finetuned_model.parameters():
            p.requires_grad_(False)
        for p in pool.values():
            p.requires_grad_(True)
        g_t = None
        for step in range(1, steps + 1):
            if len(by_group) > 1:
                g_r = agreed_grads(finetuned_model, tokenizer, by_group, pool, aligned, batch_size)
            else:
                g_r = nll_grads(finetuned_model, tokenizer, answers, pool, batch_size)
            if g_t is None:
                g_t = nll_grads(finetuned_model, tokenizer, task, pool, batch_size)
            names, offset = list(pool), 0
            flat = torch.empty(sum(p.numel() for p in pool.values()))
            for n in names:
                d = pool[n].detach() - aligned[n]
                s = g_r[n] * d
                s += task_weight * torch.clamp(g_t[n] * d, max=0)
                s[(when[n] != 0).to(s.device) | (d == 0)] = -1
                flat[offset : offset + s.numel()] = s.view(-1)
                offset += s.numel()
            chosen = _largest_positive(flat, k)
            if len(chosen) == 0:
                break
            _set(pool, names, chosen, aligned, when, step)
            g_t = None
            if rollback_fraction:
                # The task gradient after the step sees what its weights did together;
                # the next step reuses it (stale only by the rolled-back weights).
                g_t = nll_grads(finetuned_model, tokenizer, task, pool, batch_size)
                _roll_back(pool, original, g_t, when, step, rollback_fraction)
            due = step % checkpoint_every == 0 or step == steps
            if on_checkpoint is not None and due and not on_checkpoint(step):
                break
    finally:
        for n, p in finetuned_model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        finetuned_model.train(was_training)
    return when
