"""`restore`: alignment restoration on loaded models (weightops.repair.restore describes
the method, its choices and its memory)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from weightops.errors import WeightopsError
from weightops.repair.restore_reader import _Reader
from weightops.repair.restore_steps import _apply, _batches, _pool, _Run
from weightops.steering.layers import find_layers


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


@dataclass(frozen=True)
class AlignedReference:
    """What restoration needs of the aligned model, so that it need not stay loaded:
    h*, its mean state at layer `layers` at the last token of the harmful prompts, its
    depth, and its values of the weights that may be restored (blocks 0 … layers − 1,
    norms excluded)."""

    target: torch.Tensor
    layers: int
    depth: int
    values: Mapping[str, torch.Tensor]


def _layers(depth: int, layers: int | None) -> int:
    n_layers = max(1, depth // 2) if layers is None else int(layers)
    if not 1 <= n_layers <= depth:
        raise RestoreError(f"layers must be in 1 … {depth} (got {layers})")
    return n_layers


def aligned_reference(
    aligned_model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[Any],
    *,
    layers: int | None = None,
    batch_size: int = 8,
    before_pass: Callable[[nn.Module, int], None] | None = None,
) -> AlignedReference:
    """The `AlignedReference` of a loaded aligned model (`layers`: L, default half the
    depth). The values are the model's own tensors (no copy); `before_pass(model, L)`
    runs after they are taken and before h* is measured."""
    if not harmful:
        raise RestoreError("no harmful prompts given", hint="pass at least one")
    depth = len(find_layers(aligned_model).blocks)
    n_layers = _layers(depth, layers)
    values = {n: p.detach() for n, p in _pool(aligned_model, n_layers).items()}
    if before_pass is not None:
        before_pass(aligned_model, n_layers)
    device = next(aligned_model.parameters()).device
    training = aligned_model.training
    aligned_model.eval()
    try:
        target = _Reader(
            aligned_model, n_layers, _batches(harmful, tokenizer, device, batch_size)
        ).mean()
    finally:
        aligned_model.train(training)
    return AlignedReference(target, n_layers, depth, values)


def restore(
    finetuned_model: nn.Module,
    aligned_model: nn.Module | AlignedReference,
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
    `aligned_model`, which must have the same architecture, or from its
    `AlignedReference` (then `layers` is the reference's). `harmful` and `task` are
    `weightops.repair.data.Example`s (only their prompts are read for the directions);
    `task_metric(model) -> float` scores the task, higher is better (default:
    `weightops.repair.evaluate.task_score` on `task` with `metric(prompt, completion,
    reference)`, exact match by default). `layers` is L, the number of
    leading decoder blocks edited (default ⌊depth/2⌋). See weightops.repair.restore."""
    _check_settings(fraction, steps, metric_drop, rollback_fraction, checkpoint_every)
    if not harmful:
        raise RestoreError("no harmful prompts given", hint="pass at least one")
    if not task:
        raise RestoreError("no task prompts given", hint="pass at least one")
    depth = len(find_layers(finetuned_model).blocks)
    given = aligned_model if isinstance(aligned_model, AlignedReference) else None
    al_depth = given.depth if given else len(find_layers(aligned_model).blocks)  # type: ignore[arg-type]
    if al_depth != depth:
        raise RestoreError("the aligned and fine-tuned models have different depths")
    n_layers = _layers(depth, layers)
    if given is not None and layers is not None and n_layers != given.layers:
        raise RestoreError(
            f"layers {layers} differs from the {given.layers} the aligned reference was made for"
        )
    n_layers = given.layers if given is not None else n_layers
    if task_metric is None:
        from weightops.repair.evaluate import task_score

        task_list = list(task)

        def task_metric(model: nn.Module) -> float:
            return task_score(model, tokenizer, task_list, metric=metric)

    pool = _pool(finetuned_model, n_layers)
    device = next(finetuned_model.parameters()).device
    h_batches = _batches(harmful, tokenizer, device, batch_size)
    t_batches = _batches(task, tokenizer, device, batch_size)
    reference = given or aligned_reference(
        aligned_model,  # type: ignore[arg-type]
        tokenizer,
        harmful,
        layers=n_layers,
        batch_size=batch_size,
    )
    for n, p in pool.items():
        a = reference.values.get(n)
        if a is None or a.shape != p.shape:
            raise RestoreError(
                f"tensor {n!r} is missing from the aligned model or has another shape",
                hint="both models must come from the same base",
            )
    # Looked up when used: the values may be read from the checkpoint each time.
    aligned = reference.values
    pool_size = sum(p.numel() for p in pool.values())
    k = 0 if fraction == 0 else max(1, round(fraction * pool_size))

    training = finetuned_model.training  # restored on the way out
    flags = {n: p.requires_grad for n, p in finetuned_model.named_parameters()}
    finetuned_model.eval()
    try:
        for p in finetuned_model.parameters():
            p.requires_grad_(False)
        h_star = reference.target.to(device)
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
        _apply(pool, aligned, saved, run, kept_step)
        # With steps or k at 0 the kept run touched nothing, so its record is all zeros.
        restored_at = (
            {n: run.when(n) for n in pool}
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
        finetuned_model.train(training)
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
