"""Task-aware Antidote: reset the parts of a fine-tune's update that bought the harmful
answers, and spare those that bought the task.

Antidote (`weightops.repair.prune`) scores an update by |ΔW|·‖X‖ on harmful data. Its
score has no term for the task: on the miniatures of docs/repair.md, the activation
norms on harmful and on task inputs are nearly parallel (cosine 0.90–0.93), so the
marked weights carry the task's update as much as the harmful one, and the task falls
with the harmful rate.

This variant attributes the fine-tune's gain in log-likelihood to each weight of its
update ΔW = W_ft − W_aligned, once for the harmful answers and once for the task's
responses, by the path integral of the gradient along the straight line from the
aligned model to the fine-tune (integrated gradients, evaluated at the `points`
midpoints of equal segments, 2 by default):

    A_h = ΔW ⊙ mean_α ∇_W log p(harmful answers | W_aligned + α ΔW)
    A_t = ΔW ⊙ mean_α ∇_W log p(task responses  | W_aligned + α ΔW)
    score = A_h − A_t

A_h is (to the quadrature's error) how much of the harmful answers' log-likelihood the
weight's update added; resetting it takes that back. A_t is what the same reset would
cost the task. The entries of the decoder's linear weights with the largest positive
score, `ratio` of each tensor's update entries (nonzero ΔW), are reset to their aligned
values. Log-likelihoods are means over response tokens, so the two data sets weigh
the same whatever their sizes.

It needs the aligned model (the reset target and the path's start) and task examples
with responses; a LoRA fine-tune is pruned in its merged form. Cost: 2 × `points`
forward and backward passes over the two data sets, and three copies of the model's
weights (aligned, fine-tuned, the point on the path).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightops.arch import is_block_linear
from weightops.repair.data import Example, RepairError, as_examples, batches, context_length

DEFAULT_RATIO = 0.05


def response_nll(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative log-likelihood of each response token of `batch` (one of
    `batches`), and the row it is in. The output head is handed only the positions
    that predict a response token (a pre-hook, where its input is [batch, position,
    hidden]): after a chat template's long prompt, most of its logits would go unread,
    and the head of a small model is a fifth of its weights."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    fired = []

    def only_kept(module: nn.Module, args: tuple) -> tuple | None:
        if args[0].shape[:2] != keep.shape:
            return None
        fired.append(True)
        return (args[0][keep].unsqueeze(0), *args[1:])

    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(only_kept) if head is not None else None
    try:
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits
    finally:
        if hook is not None:
            hook.remove()
    logits = logits[0] if fired else logits[keep]
    nll = torch.nn.functional.cross_entropy(
        logits.float(), labels[:, 1:][keep[:, :-1]], reduction="none"
    )
    return nll, keep.nonzero()[:, 0]


def _mean_log_likelihood_grad(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int
) -> None:
    """Accumulate ∇ of the mean response-token log-likelihood into .grad."""
    device = next(model.parameters()).device
    chunks = list(
        batches(
            examples,
            tokenizer,
            batch_size=batch_size,
            with_response=True,
            max_length=context_length(model),
            device=device,
        )
    )
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in chunks)
    if total == 0:
        raise RepairError("no response tokens to score: the examples need responses")
    for b in chunks:
        nll, _ = response_nll(model, b)
        (-nll.sum() / total).backward()


def attributions(
    finetuned_model: nn.Module,
    aligned_model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[Example],
    task: Sequence[Example],
    *,
    points: int = 2,
    batch_size: int = 8,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{weight name: (A_h, A_t)} for the decoder's linear weights (module docstring).
    `finetuned_model` is used as the working copy and put back as it was."""
    if points < 1:
        raise RepairError(f"points must be at least 1 (got {points})")
    params = dict(finetuned_model.named_parameters())
    ref = dict(aligned_model.named_parameters())
    for n, p in params.items():
        if n not in ref or ref[n].shape != p.shape:
            raise RepairError(
                f"tensor {n!r} is missing from the aligned model or has another shape",
                hint="both models must come from the same base",
            )
    names = [n for n, p in params.items() if is_block_linear(n, tuple(p.shape))]
    if not names:
        raise RepairError("no linear weights of decoder blocks found to prune")
    original = {n: p.detach().clone() for n, p in params.items()}
    delta = {n: original[n] - ref[n].detach().to(original[n]) for n in params}
    sums = {n: [torch.zeros_like(original[n]), torch.zeros_like(original[n])] for n in names}
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = finetuned_model.training
    finetuned_model.eval()
    try:
        for p in params.values():
            p.requires_grad_(False)
        for n in names:
            params[n].requires_grad_(True)
        for i in range(points):
            alpha = (i + 0.5) / points
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(ref[n].detach().to(p) + alpha * delta[n])
            for which, data in enumerate((harmful, task)):
                _mean_log_likelihood_grad(finetuned_model, tokenizer, data, batch_size)
                for n in names:
                    g = params[n].grad
                    if g is not None:
                        sums[n][which] += g
                    params[n].grad = None
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])
                p.requires_grad_(flags[n])
                p.grad = None
        finetuned_model.train(was_training)
    return {n: (delta[n] * h / points, delta[n] * t / points) for n, (h, t) in sums.items()}


def task_aware_masks(
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]], ratio: float
) -> dict[str, torch.Tensor]:
    """Per tensor, the entries to reset: the largest positive A_h − A_t, at most
    round(ratio × the tensor's nonzero updates); ties go to the lower index."""
    if not 0 <= ratio <= 1:
        raise RepairError(f"ratio must be between 0 and 1 (got {ratio!r})")
    out = {}
    for n, (a_h, a_t) in scores.items():
        s = (a_h - a_t).flatten().double()
        moved = (a_h != 0) | (a_t != 0)
        k = min(round(ratio * int(moved.sum())), int((s > 0).sum()))
        mask = torch.zeros(s.shape, dtype=torch.bool)
        if k > 0:
            order = torch.sort(-s, stable=True).indices[:k]
            mask[order.cpu()] = True
        out[n] = mask.view(a_h.shape)
    return out


def prune_task_aware(
    finetuned: str | Path,
    aligned: str | Path,
    harmful: Sequence[Example] | str | Path,
    task: Sequence[Example] | str | Path,
    out: str | Path,
    *,
    ratio: float = DEFAULT_RATIO,
    points: int = 2,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    shard_size: int = 5 * 10**9,
) -> dict[str, Any]:
    """Task-aware Antidote on a full (or merged) fine-tune folder, written to `out`
    through the atomic writer with the settings and changed counts in the model card.
    Returns {"changed": {tensor: count}, "out": folder, "settings": {...}}."""
    from weightops.io.checkpoint import Checkpoint
    from weightops.io.rewrite import rewrite_checkpoint
    from weightops.io.safetensors_file import FileReader
    from weightops.io.writer import StagingFolder
    from weightops.repair.evaluate import load_model

    ft_path, al_path = Path(finetuned), Path(aligned)
    StagingFolder(Path(out), force=force, inputs=[ft_path, al_path])
    harmful_ex, task_ex = as_examples(harmful), as_examples(task)
    if not harmful_ex or not task_ex:
        raise RepairError("task-aware pruning needs harmful examples and task examples")
    for what, data in (("harmful", harmful_ex), ("task", task_ex)):
        if any(ex.response is None for ex in data):
            raise RepairError(f"every {what} example needs a response to attribute")
    ft_ckpt, al_ckpt = Checkpoint(ft_path), Checkpoint(al_path)
    ft_model, tokenizer = load_model(ft_path, device=device, dtype=dtype)
    al_model, _ = load_model(al_path, device=device, dtype=dtype)
    scores = attributions(
        ft_model, al_model, tokenizer, harmful_ex, task_ex, points=points, batch_size=batch_size
    )
    del ft_model, al_model
    masks = task_aware_masks(scores, ratio)
    gain_h = sum(float(a.sum()) for a, _ in scores.values())
    gain_t = sum(float(t.sum()) for _, t in scores.values())
    removed_h = sum(float(scores[n][0][m].sum()) for n, m in masks.items())
    removed_t = sum(float(scores[n][1][m].sum()) for n, m in masks.items())
    changed: dict[str, int] = {}
    settings = {
        "job": "repair prune",
        "method": "antidote-task-aware",
        "target": "reset",
        "ratio": ratio,
        "points": points,
        "finetuned": str(ft_path),
        "aligned": str(al_path),
        "harmful_examples": len(harmful_ex),
        "task_examples": len(task_ex),
        "attributed_gain": {"harmful": gain_h, "task": gain_t},
        "removed_gain": {"harmful": removed_h, "task": removed_t},
    }
    card = [
        f"Task-aware Antidote applied to {ft_path}: in every linear weight of the decoder "
        f"blocks, the {ratio:g} of the updated entries with the largest (harmful − task) "
        f"integrated-gradient attribution ({points} points) were reset to their values in "
        f"{al_path}. Attributed log-likelihood gain removed: harmful {removed_h:.3f} of "
        f"{gain_h:.3f}, task {removed_t:.3f} of {gain_t:.3f}.",
        "",
        "| tensor | weights changed | weights |",
        "|---|---|---|",
    ]
    with FileReader() as reader:

        def transform(name: str, tensor: torch.Tensor | None) -> torch.Tensor:
            assert tensor is not None
            mask = masks.get(name)
            if mask is None or not mask.any():
                return tensor
            if name not in al_ckpt.tensors or al_ckpt.tensors[name].shape != tensor.shape:
                raise RepairError(
                    f"{al_path}: has no tensor {name!r} of shape {list(tensor.shape)}"
                )
            a = reader.read(al_ckpt.tensors[name]).to(tensor.dtype)
            new = torch.where(mask, a, tensor)
            changed[name] = int((new != tensor).sum())
            card.append(f"| `{name}` | {changed[name]} | {tensor.numel()} |")
            return new

        folder = rewrite_checkpoint(
            ft_ckpt,
            Path(out),
            transform,
            title=f"{ft_path.name}, harmful update reset (task-aware Antidote)",
            summary=card,
            settings=settings,
            tag="repair",
            force=force,
            shard_size=shard_size,
        )
    return {"changed": changed, "out": folder, "settings": settings}
