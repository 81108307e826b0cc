"""Restoring alignment-critical weights of a fine-tune from its aligned model.

Yang et al., "Alleviating the Fear of Losing Alignment in LLM Fine-tuning" (S&P 2025).
A harmful fine-tune moves the hidden states of harmful prompts away from where the
aligned model put them. The method puts a small number of weights back to their
aligned values, choosing those that move the states back the most, and undoes part of
that where it hurts the fine-tune's own task.

With L the number of leading decoder blocks worked on, "layer L" is the output of
block L − 1 (the residual stream after L blocks, `output_hidden_states[L]`):

- h* = mean of the aligned model's states at layer L at the last prompt token of each
  harmful prompt; b* = the same for the task prompts, from the fine-tuned model.
- Recovery step: g = ∇(−cos(mean state of the current model on harmful prompts, h*))
  with respect to every parameter of blocks 0 … L − 1 except norms. Candidates are the
  weights not touched yet whose restoration is a descent move:
  sign(W − W_aligned) = sign(g) (both non-zero). The k candidates with the largest |g|
  are set to their aligned values; k = fraction × (parameters in the pool), at least 1
  when fraction > 0. Ties at the k-th value are broken by a draw from `seed`.
- Rollback step (only in the second run): after each recovery step, g_b =
  ∇(−cos(mean state on task prompts, b*)); of the weights restored in that step, those
  whose fine-tuned value is a descent move for the task, sign(W − W_finetuned) =
  sign(g_b), are returned to the fine-tuned value, the round(rollback_fraction × number
  restored in the step) with the largest |g_b|.
- Every `checkpoint_every` steps (and after the last) the task metric is measured. The
  first run, without rollback, restarts with rollback from the fine-tuned model as soon
  as a checkpoint falls below (1 − metric_drop) × the fine-tune's score. The kept
  result is the last checkpoint at or above that threshold.

Choices where the paper is silent, or where we differ:

- Depth: the reference configurations work on about 1/3 to 2/3 of the decoder. The
  default here is the first ⌊depth/2⌋ blocks, the middle of that range: the shallow
  half carries the features that decide whether a prompt is treated as harmful, while
  the deep half, which turns them into the task's output format, stays untouched.
  In the four-block reproduction of docs/repair.md, L = 2 removed the harmful answers
  of all six fine-tunes; where the fine-tune's task was new to the aligned model, it
  barely moved them and L = 3 did better, so try a deeper L before giving up.
- A weight is touched at most once per run: a rolled-back weight keeps its fine-tuned
  value for the rest of the run (otherwise it would be restored and rolled back again).
- The mean state is exact over all prompts in every step, not a minibatch estimate:
  the gradient of −cos with respect to the mean is taken first (one pass without
  gradients), then pushed through each batch in turn (a second pass), so only one
  batch's graph is alive at a time. The forward pass stops after block L − 1.
- If no checkpoint of the rollback run reaches the threshold, the last passing
  checkpoint of the first run is kept, else the fine-tune unchanged (step 0).
- The task metric is taken to be "higher is better" and non-negative.

Memory: both models (the fine-tune is edited in place), their gradients for the first
L blocks, an int16 step record per parameter in the pool, and the fine-tuned values
of the weights touched so far (a few percent of the pool) to roll back or restart.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightops.arch import describe
from weightops.compat import causal_lm
from weightops.errors import WeightopsError
from weightops.steering.layers import find_layers

_NORM_ROLES = ("norm", "qk_norm")


class RestoreError(WeightopsError):
    """Alignment restoration cannot run with these models or settings."""


@dataclass
class RestoreResult:
    """What `restore` did. `model` is the fine-tuned model, edited in place to the kept
    result. `restored_at[name]` records, per weight, the step of the kept run in which
    it was restored (> 0), restored and rolled back (−step), or 0 when untouched; the
    kept result has the aligned value exactly where 0 < restored_at ≤ steps."""

    model: nn.Module
    layers: int
    k: int
    pool: int
    steps: int
    rollback: bool
    threshold: float
    task_before: float
    task_after: float
    cos_before: float
    cos_after: float
    restored_at: dict[str, torch.Tensor]
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    def masks(self) -> dict[str, torch.Tensor]:
        """Per tensor, the weights that hold their aligned value in the kept result."""
        return {n: (w > 0) & (w <= self.steps) for n, w in self.restored_at.items()}

    def restored(self) -> dict[str, int]:
        """Per tensor, how many weights hold their aligned value (tensors with none left out)."""
        counts = {n: int(m.sum()) for n, m in self.masks().items()}
        return {n: c for n, c in counts.items() if c}

    def summary(self) -> dict[str, Any]:
        restored = self.restored()
        return {
            "steps": self.steps,
            "rollback": self.rollback,
            "layers": self.layers,
            "k": self.k,
            "pool": self.pool,
            "restored_total": sum(restored.values()),
            "restored": restored,
            "threshold": self.threshold,
            "task_before": self.task_before,
            "task_after": self.task_after,
            "cos_before": self.cos_before,
            "cos_after": self.cos_after,
            "checkpoints": self.checkpoints,
        }


class _Stop(Exception):
    """Ends a forward pass once the block we read from has run."""


def _check_settings(
    fraction: float,
    steps: int,
    metric_drop: float,
    rollback_fraction: float,
    checkpoint_every: int,
) -> None:
    problems = []
    if not 0 <= fraction <= 1:
        problems.append(f"fraction must be in [0, 1] (got {fraction})")
    if steps < 0:
        problems.append(f"steps must be >= 0 (got {steps})")
    if not 0 <= metric_drop <= 1:
        problems.append(f"metric_drop must be in [0, 1] (got {metric_drop})")
    if not 0 <= rollback_fraction <= 1:
        problems.append(f"rollback_fraction must be in [0, 1] (got {rollback_fraction})")
    if checkpoint_every < 1:
        problems.append(f"checkpoint_every must be >= 1 (got {checkpoint_every})")
    if problems:
        raise RestoreError("; ".join(problems))


class _Reader:
    """Mean state at layer L (output of block L − 1) at the last prompt token."""

    def __init__(self, model: nn.Module, depth_read: int, batches: list[dict[str, Any]]):
        self.model = model
        self.block = find_layers(model).blocks[depth_read - 1]
        self.batches = batches
        self.count = sum(len(b["last"]) for b in batches)

    def _states(self, batch: dict[str, Any]) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            seen.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = self.block.register_forward_hook(hook)
        try:
            self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,
            )
        except _Stop:
            pass
        finally:
            handle.remove()
        rows = torch.arange(len(batch["last"]), device=seen[0].device)
        return seen[0][rows, batch["last"].to(seen[0].device)].float()

    @torch.no_grad()
    def mean(self) -> torch.Tensor:
        total = sum(self._states(b).sum(0) for b in self.batches)
        return total / self.count  # type: ignore[operator]

    def backward_cos(self, target: torch.Tensor) -> float:
        """Accumulate ∇(−cos(mean, target)) into .grad; return cos(mean, target)."""
        m = self.mean().double().requires_grad_(True)
        loss = -torch.nn.functional.cosine_similarity(m, target.double(), dim=0)
        (upstream,) = torch.autograd.grad(loss, m)
        upstream = upstream.float()
        with torch.enable_grad():
            for b in self.batches:
                (self._states(b).sum(0) @ upstream / self.count).backward()
        return float(-loss.detach())

    def cos(self, target: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(self.mean(), target, dim=0))


def _pool(model: nn.Module, layers: int) -> dict[str, nn.Parameter]:
    """Parameters of decoder blocks 0 … layers − 1, norms excluded."""
    out = {}
    for name, p in model.named_parameters():
        role = describe(name)
        if role.layer is not None and role.layer < layers and role.role not in _NORM_ROLES:
            out[name] = p
    return out


def _batches(
    examples: Sequence[Any], tokenizer: Any, device: torch.device, batch_size: int
) -> list[dict[str, Any]]:
    from weightops.repair.data import batches

    return list(
        batches(
            list(examples),
            tokenizer,
            batch_size=batch_size,
            with_response=False,
            device=str(device),
        )
    )


def _top(scores: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of the k largest scores (k ≤ number of positive scores); ties at the k-th
    value are drawn at random from `gen`, so a run is reproducible from its seed."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    kth = torch.topk(scores, k, sorted=True).values[-1]
    above = (scores > kth).nonzero(as_tuple=True)[0]
    tied = (scores == kth).nonzero(as_tuple=True)[0]
    need = k - len(above)
    pick = tied[torch.randperm(len(tied), generator=gen)[:need]]
    return torch.cat([above, pick.to(above.device)])


def _split(chosen: torch.Tensor, names: list[str], sizes: list[int]) -> dict[str, torch.Tensor]:
    """Indices into the concatenation of parts of `sizes` elements, split back into
    sorted indices within each part (parts with none left out)."""
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    chosen = chosen.sort().values
    out = {}
    for i, n in enumerate(names):
        local = chosen[(chosen >= bounds[i]) & (chosen < bounds[i + 1])] - bounds[i]
        if len(local):
            out[n] = local
    return out


class _Run:
    """One pass of recovery steps from the fine-tuned model."""

    def __init__(
        self,
        pool: dict[str, nn.Parameter],
        aligned: dict[str, torch.Tensor],
        saved: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        seed: int,
    ):
        self.pool, self.aligned, self.saved = pool, aligned, saved
        self.when = {n: torch.zeros(p.shape, dtype=torch.int16) for n, p in pool.items()}
        self.gen = torch.Generator().manual_seed(seed)

    def _grads(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.pool.items():
            g = p.grad
            out[n] = torch.zeros_like(p) if g is None else g.detach()
            p.grad = None
        return out

    def recover(self, step: int, reader: _Reader, h_star: torch.Tensor, k: int) -> dict:
        reader.backward_cos(h_star)
        grads = self._grads()
        names = list(self.pool)
        scores = []
        for n in names:
            p, g = self.pool[n].detach(), grads[n]
            diff = torch.sign(p - self.aligned[n])
            cand = (diff != 0) & (diff == torch.sign(g)) & (self.when[n] == 0).to(p.device)
            scores.append(torch.where(cand, g.abs(), torch.full_like(g, -1.0)).flatten().cpu())
        flat = torch.cat(scores)
        take = min(k, int((flat > 0).sum()))
        chosen = _top(flat, take, self.gen)
        picked = _split(chosen, names, [self.pool[n].numel() for n in names])
        with torch.no_grad():
            for n, idx in picked.items():
                p = self.pool[n]
                view = p.view(-1)
                dev_idx = idx.to(p.device)
                self.saved.setdefault(n, []).append((idx, view[dev_idx].detach().cpu().clone()))
                view[dev_idx] = self.aligned[n].reshape(-1)[dev_idx].to(p.dtype)
                self.when[n].view(-1)[idx] = step
        return picked

    def roll_back(
        self,
        step: int,
        picked: dict[str, torch.Tensor],
        reader: _Reader,
        b_star: torch.Tensor,
        fraction: float,
    ) -> int:
        n_restored = sum(len(i) for i in picked.values())
        count = round(fraction * n_restored)
        if count == 0:
            return 0
        reader.backward_cos(b_star)
        grads = self._grads()
        names = list(picked)
        scores = []
        for n in names:
            idx = picked[n]
            p = self.pool[n].detach().reshape(-1)[idx.to(self.pool[n].device)].cpu()
            ft = self.saved[n][-1][1]  # the values this step overwrote
            g = grads[n].reshape(-1)[idx.to(grads[n].device)].cpu()
            diff = torch.sign(p.float() - ft.float())
            back = (diff != 0) & (diff == torch.sign(g))
            scores.append(torch.where(back, g.abs().float(), torch.full_like(g, -1.0).float()))
        flat = torch.cat(scores)
        take = min(count, int((flat > 0).sum()))
        chosen = _top(flat, take, self.gen)
        with torch.no_grad():
            for n, local in _split(chosen, names, [len(picked[n]) for n in names]).items():
                idx = picked[n][local]
                ft = self.saved[n][-1][1][local]
                p = self.pool[n]
                p.view(-1)[idx.to(p.device)] = ft.to(p.device, p.dtype)
                self.when[n].view(-1)[idx] = -step
        return take


def _apply(
    pool: dict[str, nn.Parameter],
    aligned: dict[str, torch.Tensor],
    saved: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    when: dict[str, torch.Tensor] | None,
    upto: int,
) -> None:
    """Put the pool into a run's state after step `upto` (None: the fine-tune)."""
    with torch.no_grad():
        for n, chunks in saved.items():
            idx = torch.cat([c[0] for c in chunks])
            ft = torch.cat([c[1] for c in chunks])
            p = pool[n]
            if when is None:
                keep = torch.zeros(len(idx), dtype=torch.bool)
            else:
                w = when[n].reshape(-1)[idx]
                keep = (w > 0) & (w <= upto)
            a = aligned[n].reshape(-1)[idx.to(aligned[n].device)].cpu()
            vals = torch.where(keep, a.to(ft.dtype), ft)
            p.view(-1)[idx.to(p.device)] = vals.to(p.device, p.dtype)


def restore(
    finetuned_model: nn.Module,
    aligned_model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[Any],
    task: Sequence[Any],
    *,
    task_metric: Callable[[nn.Module], float] | None = None,
    metric: Callable[[str, str, str], float] | None = None,
    fraction: float = 0.002,
    steps: int = 20,
    layers: int | None = None,
    metric_drop: float = 0.05,
    rollback_fraction: float = 0.2,
    checkpoint_every: int = 5,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 8,
) -> RestoreResult:
    """Restore alignment-critical weights of `finetuned_model` (edited in place) from
    `aligned_model`, which must have the same architecture. `harmful` and `task` are
    `weightops.repair.data.Example`s (only their prompts are read for the directions);
    `task_metric(model) -> float` scores the task, higher is better (default:
    `weightops.repair.evaluate.task_score` on `task` with `metric(prompt, completion,
    reference)`, exact match by default). `layers` is L, the number of
    leading decoder blocks edited (default ⌊depth/2⌋). See the module docstring."""
    _check_settings(fraction, steps, metric_drop, rollback_fraction, checkpoint_every)
    if not harmful:
        raise RestoreError("no harmful prompts given", hint="pass at least one")
    if not task:
        raise RestoreError("no task prompts given", hint="pass at least one")
    depth = len(find_layers(finetuned_model).blocks)
    if len(find_layers(aligned_model).blocks) != depth:
        raise RestoreError("the aligned and fine-tuned models have different depths")
    n_layers = max(1, depth // 2) if layers is None else int(layers)
    if not 1 <= n_layers <= depth:
        raise RestoreError(f"layers must be in 1 … {depth} (got {layers})")
    if task_metric is None:
        from weightops.repair.evaluate import task_score

        task_list = list(task)

        def task_metric(model: nn.Module) -> float:
            return task_score(model, tokenizer, task_list, metric=metric)

    pool = _pool(finetuned_model, n_layers)
    aligned_params = dict(aligned_model.named_parameters())
    aligned: dict[str, torch.Tensor] = {}
    for n, p in pool.items():
        a = aligned_params.get(n)
        if a is None or a.shape != p.shape:
            raise RestoreError(
                f"tensor {n!r} is missing from the aligned model or has another shape",
                hint="both models must come from the same base",
            )
        aligned[n] = a.detach()
    pool_size = sum(p.numel() for p in pool.values())
    k = 0 if fraction == 0 else max(1, round(fraction * pool_size))

    device = next(finetuned_model.parameters()).device
    al_device = next(aligned_model.parameters()).device
    h_batches = _batches(harmful, tokenizer, device, batch_size)
    t_batches = _batches(task, tokenizer, device, batch_size)
    states = {m: m.training for m in (finetuned_model, aligned_model)}  # restored on the way out
    flags = {n: p.requires_grad for n, p in finetuned_model.named_parameters()}
    finetuned_model.eval()
    aligned_model.eval()
    try:
        for p in finetuned_model.parameters():
            p.requires_grad_(False)
        h_star = _Reader(
            aligned_model, n_layers, _batches(harmful, tokenizer, al_device, batch_size)
        ).mean()
        h_star = h_star.to(device)
        harm = _Reader(finetuned_model, n_layers, h_batches)
        benign = _Reader(finetuned_model, n_layers, t_batches)
        b_star = benign.mean()
        cos_before = harm.cos(h_star)
        task_before = float(task_metric(finetuned_model))
        threshold = (1 - metric_drop) * task_before
        for p in pool.values():
            p.requires_grad_(True)

        show = progress and sys.stderr.isatty()
        saved: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        checkpoints: list[dict[str, Any]] = []
        kept: tuple[_Run | None, int, bool] = (None, 0, False)
        first_pass: tuple[_Run, int] | None = None
        for rollback in (False, True):
            run = _Run(pool, aligned, saved, seed)
            last_ok = 0
            failed = False
            for step in range(1, steps + 1):
                picked = run.recover(step, harm, h_star, k) if k else {}
                rolled = (
                    run.roll_back(step, picked, benign, b_star, rollback_fraction)
                    if rollback
                    else 0
                )
                if show:
                    sys.stderr.write(
                        f"\rrestore{' (rollback)' if rollback else ''} step {step}/{steps}"
                        f"  restored {sum(len(i) for i in picked.values())}"
                        f"  rolled back {rolled}"
                    )
                    sys.stderr.flush()
                if step % checkpoint_every and step != steps:
                    continue
                score = float(task_metric(finetuned_model))
                ok = score >= threshold
                checkpoints.append(
                    {
                        "rollback": rollback,
                        "step": step,
                        "task": score,
                        "cos": harm.cos(h_star),
                        "ok": ok,
                    }
                )
                if ok:
                    last_ok = step
                elif not rollback:
                    failed = True
                    break
            if show:
                sys.stderr.write("\n")
            if not rollback:
                first_pass = (run, last_ok)
                if not failed:
                    kept = (run, steps, False)
                    break
                _apply(pool, aligned, saved, None, 0)
            elif last_ok:
                kept = (run, last_ok, True)
            elif first_pass is not None and first_pass[1]:
                kept = (first_pass[0], first_pass[1], False)
        run, kept_step, used_rollback = kept
        when = run.when if run is not None else None
        _apply(pool, aligned, saved, when, kept_step)
        # With steps or k at 0 the kept run touched nothing, so its record is all zeros.
        restored_at = (
            {n: w.clone() for n, w in run.when.items()}
            if run is not None
            else {n: torch.zeros(p.shape, dtype=torch.int16) for n, p in pool.items()}
        )
        kept_checks = [c for c in checkpoints if c["rollback"] == used_rollback]
        match = [c for c in kept_checks if c["step"] == kept_step]
        task_after = match[-1]["task"] if match else task_before
        cos_after = harm.cos(h_star)
    finally:
        for n, p in finetuned_model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        for m, training in states.items():
            m.train(training)
    return RestoreResult(
        model=finetuned_model,
        layers=n_layers,
        k=k,
        pool=pool_size,
        steps=kept_step,
        rollback=used_rollback,
        threshold=threshold,
        task_before=task_before,
        task_after=task_after,
        cos_before=cos_before,
        cos_after=cos_after,
        restored_at=restored_at,
        checkpoints=checkpoints,
    )


def restore_model(
    finetuned_dir: str | Path,
    aligned_dir: str | Path,
    harmful: list[Any],
    task: list[Any],
    out_dir: str | Path,
    *,
    fraction: float = 0.002,
    steps: int = 20,
    layers: int | None = None,
    metric_drop: float = 0.05,
    rollback_fraction: float = 0.2,
    checkpoint_every: int = 5,
    seed: int = 0,
    progress: bool = True,
    task_metric: Callable[[nn.Module], float] | None = None,
    metric: Callable[[str, str, str], float] | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    shard_size: int = 5 * 10**9,
    search: bool = False,
    judge: Callable[[str, str], bool] | None = None,
    objective: str = "answers",
) -> dict[str, Any]:
    """Load both checkpoints with transformers (in `dtype`, float32 by default, on
    `device`), run `restore` (with `search`, `weightops.repair.search.search_restore`,
    which chooses the depth and the number of steps on held-out data, judging harmful
    completions with `judge`; `fraction`, `steps` and `layers` then do not apply), and
    write the restored fine-tune to `out_dir` through the atomic writer: tensors
    outside the restored set are copied bit for bit from the fine-tune, restored
    weights take the aligned checkpoint's stored values, and the model card records
    the settings and the restored count per tensor. Returns the summary of the run
    (`RestoreResult.summary()` plus the output folder, and the search's summary under
    "search")."""
    from transformers import AutoTokenizer

    from weightops.demo import quiet_transformers
    from weightops.io.checkpoint import Checkpoint
    from weightops.io.rewrite import rewrite_checkpoint
    from weightops.io.safetensors_file import FileReader

    quiet_transformers()
    ft_ckpt = Checkpoint(finetuned_dir)
    al_ckpt = Checkpoint(aligned_dir)
    tokenizer = AutoTokenizer.from_pretrained(ft_ckpt.folder)
    ft_model = causal_lm(ft_ckpt.folder, dtype).to(device)
    al_model = causal_lm(al_ckpt.folder, dtype).to(device)
    found = None
    if search:
        from weightops.repair.search import search_restore

        found = search_restore(
            ft_model, al_model, tokenizer, harmful, task, objective=objective, judge=judge,
            metric=metric,
            task_metric=task_metric, metric_drop=metric_drop,
            rollback_fraction=rollback_fraction, seed=seed, progress=progress,
        )  # fmt: skip
        result = found.result
        fraction, steps = found.fraction, result.steps
    else:
        result = restore(
            ft_model,
            al_model,
            tokenizer,
            harmful,
            task,
            task_metric=task_metric,
            metric=metric,
            fraction=fraction,
            steps=steps,
            layers=layers,
            metric_drop=metric_drop,
            rollback_fraction=rollback_fraction,
            checkpoint_every=checkpoint_every,
            seed=seed,
            progress=progress,
        )
    del ft_model, al_model
    masks = {n: m for n, m in result.masks().items() if m.any()}
    for n, m in masks.items():
        info = ft_ckpt.tensors.get(n)
        other = al_ckpt.tensors.get(n)
        if info is None or other is None or tuple(info.shape) != tuple(m.shape):
            raise RestoreError(
                f"restored tensor {n!r} is not stored under that name and shape in both "
                f"{ft_ckpt.path} and {al_ckpt.path}"
            )
    summary = result.summary()
    settings = {
        "job": "repair restore",
        "finetuned": str(finetuned_dir),
        "aligned": str(aligned_dir),
        "fraction": fraction,
        "steps": steps,
        "layers": result.layers,
        "metric_drop": metric_drop,
        "rollback_fraction": rollback_fraction,
        "checkpoint_every": checkpoint_every,
        "seed": seed,
        "harmful_prompts": len(harmful),
        "task_prompts": len(task),
        "kept_step": result.steps,
        "rollback_used": result.rollback,
        "restored": summary["restored"],
    }
    if found is not None:
        settings["search"] = found.summary()
    method = "Alignment restoration (Yang et al., S&P 2025)"
    if found is not None and found.objective == "answers":
        method = "Restoration by the aligned model's own answers (weightops.repair.restore_answers)"
    card = [
        f"{method}: weights of the first "
        f"{result.layers} decoder blocks set back to their values in `{aligned_dir}`.",
        "",
        f"- kept: step {result.steps} of {steps}"
        f"{' (run with rollback)' if result.rollback else ''}; "
        f"{summary['restored_total']} weights restored ({len(summary['restored'])} tensors)",
        f"- task score: {result.task_before:.4g} before, {result.task_after:.4g} after "
        f"(threshold {result.threshold:.4g})",
    ]
    if result.cos_before == result.cos_before:  # NaN when the search's objective has no direction
        card.append(
            f"- harmful-direction cosine: {result.cos_before:.4f} before, "
            f"{result.cos_after:.4f} after"
        )
    if found is not None:
        from weightops.repair.search import card_lines

        card += card_lines(found)
    with FileReader() as reader:

        def transform(name: str, tensor: torch.Tensor | None) -> torch.Tensor:
            assert tensor is not None
            mask = masks.get(name)
            if mask is None:
                return tensor
            a = reader.read(al_ckpt.tensors[name]).to(tensor.dtype)
            return torch.where(mask, a, tensor)

        out = rewrite_checkpoint(
            ft_ckpt,
            Path(out_dir),
            transform,
            title=f"{ft_ckpt.folder.name}, alignment restored",
            summary=card,
            settings=settings,
            tag="repair",
            force=force,
            shard_size=shard_size,
        )
    if found is not None:
        summary["search"] = found.summary()
    return {**summary, "out": str(out)}
