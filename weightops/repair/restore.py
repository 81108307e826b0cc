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
  gradients), then pushed back through every batch one block at a time, deepest
  first (`weightops.repair.restore_reader`), so only one block's graph and one
  block's gradients are alive at a time; the gradients are those of the whole graph
  bit for bit. The forward pass stops after block L − 1.
- If no checkpoint of the rollback run reaches the threshold, the last passing
  checkpoint of the first run is kept, else the fine-tune unchanged (step 0).
- The task metric is taken to be "higher is better" and non-negative.

Memory. Gradients are taken for the pool only (blocks 0 … L − 1, in the compute
dtype), one block at a time: one block's graph and gradients are alive, with the
gradient at one block boundary for every batch, and each block's candidates are
scored as soon as its gradients are complete (`restore_reader`, `restore_select`).
`restore` holds the two models it is given. `restore_model` (and `weightops repair
restore`) reduces the aligned model to h* before loading the fine-tune and reads the
aligned pool values from the checkpoint when it uses them (`restore_values`), and
computes in float32 on a bfloat16 or float16 checkpoint without a float32 copy of
what it does not edit (`weightops.repair.precision`): the first L blocks are widened,
the embedding stays as stored and widens the rows it looks up, the deeper blocks and
an untied output head are widened only while the task metric runs. Its peak is the
task metric's (the model in float32 but its embedding; docs/repair.md has the
figures). Both keep the fine-tuned values of the weights touched so far (a few
percent of the pool) to roll back or restart.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightops.repair.precision import (
    deep_parameters,
    load_narrow,
    narrow_embedding,
    release_freed,
    stored_dtype,
    widen_except,
    widened,
)
from weightops.repair.restore_run import (
    AlignedReference,
    RestoreError,
    RestoreResult,
    _check_settings,
    aligned_reference,
    restore,
)
from weightops.repair.restore_values import StoredValues

__all__ = [
    "AlignedReference",
    "RestoreError",
    "RestoreResult",
    "aligned_reference",
    "restore",
    "restore_model",
]


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
    "search").

    Memory without `search`: the aligned model is loaded first, reduced to its
    `AlignedReference` and let go; its pool values are read from its checkpoint when
    used (`weightops.repair.restore_values`). A checkpoint stored in bfloat16 or
    float16 and computed in float32 is loaded in its stored dtype: the fine-tune's
    first L blocks are widened to float32 (the gradient passes run there, bit for bit
    as on a float32 load), its embedding stays narrow and widens what it looks up, and
    the rest stays narrow except while the task metric runs
    (`weightops.repair.precision`). The search needs the aligned model's answers, so
    it holds both models in `dtype`."""
    from transformers import AutoTokenizer

    from weightops.demo import quiet_transformers
    from weightops.io.checkpoint import Checkpoint
    from weightops.io.rewrite import rewrite_checkpoint
    from weightops.io.safetensors_file import FileReader

    quiet_transformers()
    _check_settings(fraction, steps, metric_drop, rollback_fraction, checkpoint_every)
    if not task:
        raise RestoreError("no task prompts given", hint="pass at least one")
    ft_ckpt = Checkpoint(finetuned_dir)
    al_ckpt = Checkpoint(aligned_dir)
    tokenizer = AutoTokenizer.from_pretrained(ft_ckpt.folder)
    found = None
    if search:
        from weightops.compat import causal_lm
        from weightops.repair.search import search_restore

        # The search needs the aligned model itself (its answers), so both are loaded whole.
        ft_model = causal_lm(ft_ckpt.folder, dtype).to(device)
        al_model = causal_lm(al_ckpt.folder, dtype).to(device)
        found = search_restore(
            ft_model, al_model, tokenizer, harmful, task, objective=objective, judge=judge,
            metric=metric,
            task_metric=task_metric, metric_drop=metric_drop,
            rollback_fraction=rollback_fraction, seed=seed, progress=progress,
        )  # fmt: skip
        del al_model
        result = found.result
        fraction, steps = found.fraction, result.steps
        deep: dict = {}
        reference = None
    else:
        al_model = load_narrow(al_ckpt.folder, stored_dtype(al_ckpt, dtype), dtype, device)

        def before_pass(model: nn.Module, n_layers: int) -> None:
            # h* is measured in `dtype`; the narrow values taken before stay the reference.
            # The pass reads the embedding's rows of the prompts' tokens and nothing deeper.
            narrow = deep_parameters(model, n_layers) + narrow_embedding(model, dtype)
            widen_except(model, dtype, narrow, own=False)

        reference = aligned_reference(
            al_model, tokenizer, harmful, layers=layers, before_pass=before_pass
        )
        values = StoredValues(al_ckpt, reference.values)
        reference = replace(reference, values=values)
        del al_model
        release_freed()
        ft_model = load_narrow(ft_ckpt.folder, stored_dtype(ft_ckpt, dtype), dtype, device)
        deep = deep_parameters(ft_model, reference.layers)
        embed = narrow_embedding(ft_model, dtype)
        widen_except(ft_model, dtype, deep + embed)
        # A tied output head is the embedding's weight, which generation needs widened.
        head = getattr(ft_model.get_output_embeddings(), "weight", None)
        deep += [w for w in embed if w is head]
        if task_metric is None:
            from weightops.repair.evaluate import task_score

            def task_metric(model: nn.Module) -> float:
                return task_score(model, tokenizer, task, metric=metric)

        def wide_metric(
            model: nn.Module, inner: Callable[[nn.Module], float] = task_metric
        ) -> float:
            with widened(deep, dtype):
                return inner(model)

        with values:
            result = restore(
                ft_model,
                reference,
                tokenizer,
                harmful,
                task,
                task_metric=wide_metric,
                fraction=fraction,
                steps=steps,
                metric_drop=metric_drop,
                rollback_fraction=rollback_fraction,
                checkpoint_every=checkpoint_every,
                seed=seed,
                progress=progress,
            )
    masks = {n: m for n, m in result.masks().items() if m.any()}
    summary = result.summary()
    # The writer reads both checkpoints tensor by tensor; the models are let go first.
    deep.clear()
    del ft_model, reference, result
    gc.collect()
    for n, m in masks.items():
        info = ft_ckpt.tensors.get(n)
        other = al_ckpt.tensors.get(n)
        if info is None or other is None or tuple(info.shape) != tuple(m.shape):
            raise RestoreError(
                f"restored tensor {n!r} is not stored under that name and shape in both "
                f"{ft_ckpt.path} and {al_ckpt.path}"
            )
    settings = {
        "job": "repair restore",
        "finetuned": str(finetuned_dir),
        "aligned": str(aligned_dir),
        "fraction": fraction,
        "steps": steps,
        "layers": summary["layers"],
        "metric_drop": metric_drop,
        "rollback_fraction": rollback_fraction,
        "checkpoint_every": checkpoint_every,
        "seed": seed,
        "harmful_prompts": len(harmful),
        "task_prompts": len(task),
        "kept_step": summary["steps"],
        "rollback_used": summary["rollback"],
        "restored": summary["restored"],
    }
    if found is not None:
        settings["search"] = found.summary()
    method = "Alignment restoration (Yang et al., S&P 2025)"
    if found is not None and found.objective == "answers":
        method = "Restoration by the aligned model's own answers (weightops.repair.restore_answers)"
    card = [
        f"{method}: weights of the first "
        f"{summary['layers']} decoder blocks set back to their values in `{aligned_dir}`.",
        "",
        f"- kept: step {summary['steps']} of {steps}"
        f"{' (run with rollback)' if summary['rollback'] else ''}; "
        f"{summary['restored_total']} weights restored ({len(summary['restored'])} tensors)",
        f"- task score: {summary['task_before']:.4g} before, {summary['task_after']:.4g} after "
        f"(threshold {summary['threshold']:.4g})",
    ]
    # NaN when the search's objective has no direction.
    if summary["cos_before"] == summary["cos_before"]:
        card.append(
            f"- harmful-direction cosine: {summary['cos_before']:.4f} before, "
            f"{summary['cos_after']:.4f} after"
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
