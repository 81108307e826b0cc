"""Aligning whole checkpoints: compatibility checks, matching, and writing the result."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from weightops.align.groups import GROUP_KINDS, AlignError, parse_groups, transformer_spec
from weightops.align.match import Alignment, CheckpointSource, MatchResult, weight_matching
from weightops.arch import family
from weightops.errors import WeightopsError
from weightops.io.checkpoint import Checkpoint
from weightops.io.rewrite import rewrite_checkpoint
from weightops.io.writer import StagingFolder
from weightops.recipe import AlignSettings
from weightops.recipe_refs import resolve_model

_MAX_LISTED = 6


def compatibility_problems(reference: Checkpoint, model: Checkpoint) -> list[str]:
    """Why `model` cannot be permuted to match `reference` (empty when it can)."""
    problems = []
    a, b = family(reference.config), family(model.config)
    if a != b and "unknown" not in (a, b):
        return [f"{model.path} is a {b} model but {reference.path} is {a}"]
    for name in sorted(set(reference.tensors) - set(model.tensors)):
        problems.append(f"tensor {name!r} of {reference.path} is missing in {model.path}")
    for name in sorted(set(model.tensors) - set(reference.tensors)):
        problems.append(f"tensor {name!r} of {model.path} is missing in {reference.path}")
    for name in sorted(set(reference.tensors) & set(model.tensors)):
        sa, sb = reference.tensors[name].shape, model.tensors[name].shape
        if sa != sb:
            problems.append(
                f"tensor {name!r} has shape {list(sb)} in {model.path} "
                f"but {list(sa)} in {reference.path}"
            )
    return problems


def check_compatible(reference: Checkpoint, model: Checkpoint) -> None:
    problems = compatibility_problems(reference, model)
    if problems:
        shown = "; ".join(problems[:_MAX_LISTED])
        more = len(problems) - _MAX_LISTED
        raise AlignError(
            f"cannot align: {shown}" + (f"; and {more} more" if more > 0 else ""),
            hint="both models must share the architecture and every tensor shape",
        )


def spec_for(reference: Checkpoint, groups: Iterable[str] = GROUP_KINDS):
    """The permutation spec of a checkpoint (from its headers and config alone)."""
    shapes = {n: i.shape for n, i in reference.tensors.items()}
    return transformer_spec(shapes, reference.config, groups)


def match_checkpoints(
    reference: Checkpoint,
    model: Checkpoint,
    *,
    groups: Iterable[str] = GROUP_KINDS,
    seed: int = 0,
    max_rounds: int = 100,
    progress: bool | None = None,
    label: str = "align",
    device: torch.device | str = "cpu",
) -> tuple[Alignment, MatchResult]:
    """Permutations that bring `model` into `reference`'s basis, streamed from disk."""
    check_compatible(reference, model)
    spec = spec_for(reference, groups)
    with CheckpointSource(reference) as ref, CheckpointSource(model) as mod:
        result = weight_matching(
            spec,
            ref,
            mod,
            seed=seed,
            max_rounds=max_rounds,
            progress=progress,
            label=label,
            device=device,
        )
    return Alignment(spec, result.perms), result


def describe_result(result: MatchResult) -> list[str]:
    """Lines for a model card or a terminal: the objective and distances."""
    b, a = result.objective_before, result.objective_after
    stop = "converged" if result.converged else "stopped at --max-rounds"
    return [
        f"- objective Σ⟨W_ref, π(W)⟩: {b:.6g} before, {a:.6g} after",
        f"- cosine similarity of all weights: {result.cosine(b):.4f} before, "
        f"{result.cosine(a):.4f} after",
        f"- relative L2 distance ‖ref − π(model)‖/‖ref‖: {result.distance(b):.4f} before, "
        f"{result.distance(a):.4f} after",
        f"- {result.rounds} round(s) of coordinate ascent, {stop}",
    ]


def align_model(
    model: str | Path,
    reference: str | Path,
    out: str | Path,
    *,
    groups: str | Iterable[str] | None = None,
    seed: int = 0,
    max_rounds: int = 100,
    force: bool = False,
    shard_size: int = 5 * 10**9,
    progress: bool | None = None,
) -> MatchResult:
    """Write `model` with its hidden units permuted to match `reference` to `out`.

    The output computes the same function as `model` (same logits up to rounding)."""
    kinds = parse_groups(groups)
    model, reference, out = Path(model), Path(reference), Path(out)
    ref_ckpt, ckpt = Checkpoint(reference), Checkpoint(model)
    for what, path in (("model", ckpt.folder), ("reference", ref_ckpt.folder)):
        if out.resolve() == path.resolve():
            raise AlignError(
                f"-o {out} is the {what}'s own folder", hint="write the aligned model elsewhere"
            )
    # Refuse a non-empty output, or one over an input, before the long work.
    StagingFolder(out, force=force, inputs=[ckpt.path, ref_ckpt.path])
    alignment, result = match_checkpoints(
        ref_ckpt, ckpt, groups=kinds, seed=seed, max_rounds=max_rounds, progress=progress
    )
    moved = result.moved
    summary = [
        f"This is `{model}` with its hidden units permuted to match `{reference}` by weight "
        "matching (Ainsworth et al., *Git Re-Basin*, ICLR 2023). It computes the same "
        "function as the original: only the order of the hidden units changed.",
        "",
        f"- reference: `{reference}`",
        f"- groups: {', '.join(kinds)} ({len(result.perms)} permutations, "
        f"{sum(1 for v in moved.values() if v)} changed)",
        f"- seed: {seed}",
        *describe_result(result),
    ]
    settings = {
        "align": {
            "model": str(model),
            "reference": str(reference),
            "groups": list(kinds),
            "seed": seed,
            "max_rounds": max_rounds,
            "rounds": result.rounds,
            "converged": result.converged,
            "objective_before": result.objective_before,
            "objective_after": result.objective_after,
        }
    }
    rewrite_checkpoint(
        ckpt,
        out,
        lambda name, tensor: alignment.apply(name, tensor),  # type: ignore[arg-type]
        title=f"{model.name} aligned to {reference.name}",
        summary=summary,
        settings=settings,
        tag="alignment",
        force=force,
        shard_size=shard_size,
    )
    return result


@dataclass(frozen=True)
class AlignTarget:
    """A recipe's `align:` key, resolved: the reference and the matching settings."""

    reference: Path
    groups: tuple[str, ...] = GROUP_KINDS
    seed: int = 0
    max_rounds: int = 100


def plan_alignment(
    settings: AlignSettings, recipe_dir: Path | None, models: list[Checkpoint]
) -> tuple[AlignTarget | None, list[str]]:
    """Check, from headers alone, that every model can be aligned to `settings.to`;
    return the resolved target and every problem found."""
    path = resolve_model(settings.to, recipe_dir)
    if path is None:
        return None, [f"align.to: model {settings.to!r} not found (no such folder or file)"]
    try:
        reference = Checkpoint(path)
        groups = parse_groups(settings.groups)
        spec_for(reference, groups)
    except WeightopsError as e:
        return None, [f"align.to: {e}"]
    problems = [p for m in models for p in compatibility_problems(reference, m)]
    return AlignTarget(path, groups, settings.seed, settings.max_rounds), problems


def match_inputs(
    target: AlignTarget,
    models: list[Path],
    *,
    progress: bool | None = None,
    device: torch.device | str = "cpu",
) -> dict[int, Alignment]:
    """Each model's permutations onto the target (by index in `models`); models that
    are the reference itself, or already in its order, get none."""
    reference = Checkpoint(target.reference)
    out = {}
    for i, path in enumerate(models):
        if path.resolve() == target.reference.resolve():
            continue
        alignment, _ = match_checkpoints(
            reference,
            Checkpoint(path),
            groups=target.groups,
            seed=target.seed,
            max_rounds=target.max_rounds,
            progress=progress,
            label=f"align {path.name}",
            device=device,
        )
        if alignment.perms:
            out[i] = alignment
    return out
