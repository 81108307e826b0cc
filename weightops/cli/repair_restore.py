"""`weightops repair restore`: put back the aligned values of a few weights of a
fine-tune, with its settings searched on held-out data by default."""

from __future__ import annotations

from pathlib import Path

import typer

from weightops.cli import _common
from weightops.cli._common import parse_size, user_errors
from weightops.cli.repair import METRIC, _dtype, _metric, repair_app

# restore --no-search: the paper's share of the pool per step and number of steps.
PAPER_FRACTION, PAPER_STEPS = 0.002, 20


@repair_app.command("restore")
def restore(
    finetuned: Path = typer.Option(..., "--finetuned", help="The fine-tuned model folder."),
    aligned: Path = typer.Option(
        ..., "--aligned", help="The aligned model it was fine-tuned from."
    ),
    harmful: Path = typer.Option(
        ...,
        "--harmful",
        help="JSONL of harmful prompts (the paper uses 256); their last-token states in "
        "the aligned model define the direction to restore.",
    ),
    task: Path = typer.Option(
        ...,
        "--task",
        help="JSONL of the fine-tune's task prompts with reference responses; the task "
        "score guards against restoring too much. Use a few hundred examples if you have "
        "them: with 64, one answer moves the score by 1.6 points.",
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    search: bool | None = typer.Option(
        None,
        "--search/--no-search",
        help="Choose the depth and the number of steps on held-out halves of --harmful and "
        "--task, cross-fitted (default: on when both have at least 16 examples and none of "
        "--fraction, --steps, --layers is given). --no-search runs the paper's settings.",
    ),
    objective: str = typer.Option(
        "answers",
        "--objective",
        help="What the search restores by: answers (the aligned model's own answers to the "
        "harmful prompts, teacher-forced, against the task's loss; the default) or states "
        "(the paper's last-token hidden state).",
    ),
    fraction: float | None = typer.Option(
        None,
        "--fraction",
        help="Weights restored per step, as a share of the candidate pool (default 0.2%, "
        "the paper's; implies --no-search).",
    ),
    steps: int | None = typer.Option(
        None, "--steps", help="Recovery steps (default 20, the paper's; implies --no-search)."
    ),
    layers: int | None = typer.Option(
        None,
        "--layers",
        help="Work on the first N decoder blocks (default: half the depth; the paper's "
        "configurations use 1/3 to 2/3; implies --no-search).",
    ),
    metric_drop: float = typer.Option(
        0.05,
        "--metric-drop",
        help="Largest tolerated relative drop of the task score before rolling back "
        "(0.05: keep at least 95% of it).",
    ),
    rollback_fraction: float = typer.Option(
        0.2,
        "--rollback-fraction",
        help="Share of each step's restored weights returned to their fine-tuned values "
        "in the rollback run (20% in the paper; the search's rollback runs too).",
    ),
    checkpoint_every: int = typer.Option(
        5, "--checkpoint-every", help="Measure the task score every N steps."
    ),
    metric: str | None = METRIC,
    refusal_pattern: list[str] = typer.Option(
        [],
        "--refusal-pattern",
        metavar="REGEX",
        help="For the search: a completion matching this regular expression is a refusal "
        "(repeatable; default: the built-in refusal phrases and the aligned model's own "
        "answers to the held-out harmful prompts).",
    ),
    judge: str | None = typer.Option(
        None,
        "--judge",
        metavar="MODULE:FUNCTION",
        help="For the search: judge(prompt, completion) -> bool, true when harmful.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the held-out split and for ties."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
    device: str = typer.Option("cpu", "--device", help="Device for the forward passes."),
    dtype: str = typer.Option(
        "float32", "--dtype", help="Compute dtype: float32, bfloat16 or float16."
    ),
    force: bool = _common.FORCE,
    shard_size: str = _common.SHARD_SIZE,
) -> None:
    """Alignment restoration (Yang et al., S&P 2025): set back to their aligned values
    the few weights that move harmful prompts' hidden states back towards the aligned
    model's.

    Each step restores the --fraction of the weights of the first --layers blocks with
    the largest gradient of −cos(mean harmful state, aligned mean harmful state) whose
    restoration is a descent move. If the task score falls below (1 − --metric-drop) of
    the fine-tune's, the run restarts with rollback: after each step the
    --rollback-fraction of that step's weights that matter most to the task go back to
    their fine-tuned values. The last checkpoint above the threshold is kept.

    By default (with 16 or more harmful and task examples) the settings are
    chosen automatically instead, by cross-fitting on two halves of each file
    (harmful prompts split by request): the aligned model answers one half's
    harmful prompts (its refusals), and each step restores the 0.4% of the
    decoder's weights whose aligned values most raise the likelihood of those
    answers, for most requests alike, without raising the task's loss; one such
    trajectory on all blocks and one on the first half (up to 20 steps) are fitted
    on each half and measured on the other every 2 steps (44 measurements at most;
    a trajectory that loses the task starts again with rollback, as in the paper,
    and is then measured through any dip in the task). Of the points measured in
    both halves, the one with the lowest harmful rate over both whose task score
    stays within --metric-drop of the fine-tune's is chosen, and the fine-tune is
    restored with those settings on all the examples (the fine-tune itself is
    written if no point is better). The chosen settings and the Pareto front go to
    the model card and the settings in the safetensors metadata. --no-search, or
    any of --fraction, --steps, --layers, runs the paper's restoration with the
    paper's settings.

    Peak memory, float32 on a bfloat16 checkpoint: about 1.9× the model's float32 size
    for the paper's restoration at the default --layers, interpreter included (the first
    blocks in float32, their gradients one block at a time; the rest as stored, widened
    but for the embedding only for the task score, which is the peak); the search holds
    both models in float32. See docs/repair.md.
    """
    size = parse_size(shard_size)
    with user_errors():
        from weightops.repair.data import RepairError, load_examples
        from weightops.repair.judges import load_callable, refusal_judge
        from weightops.repair.restore import restore_model
        from weightops.repair.search import MIN_EXAMPLES

        task_metric = _metric(metric)
        if judge is not None and refusal_pattern:
            raise RepairError("--judge and --refusal-pattern: give one or the other")
        harm_judge = None
        if judge is not None:
            harm_judge = load_callable(judge, option="--judge")
        elif refusal_pattern:
            harm_judge = refusal_judge(refusal_pattern)
        harmful_ex, task_ex = load_examples(harmful), load_examples(task)
        manual = any(v is not None for v in (fraction, steps, layers))
        if search and manual:
            raise RepairError(
                "--search chooses --fraction, --steps and --layers itself: drop them or "
                "use --no-search"
            )
        enough = min(len(harmful_ex), len(task_ex)) >= MIN_EXAMPLES
        if search is None:
            search = enough and not manual
            if not search and not manual:
                typer.echo(
                    f"fewer than {MIN_EXAMPLES} harmful or task examples: no search, the "
                    "paper's settings",
                    err=True,
                )
        summary = restore_model(
            finetuned,
            aligned,
            harmful_ex,
            task_ex,
            output,
            metric=task_metric,
            search=search,
            judge=harm_judge,
            objective=objective,
            fraction=PAPER_FRACTION if fraction is None else fraction,
            steps=PAPER_STEPS if steps is None else steps,
            layers=layers,
            metric_drop=metric_drop,
            rollback_fraction=rollback_fraction,
            checkpoint_every=checkpoint_every,
            seed=seed,
            progress=progress,
            device=device,
            dtype=_dtype(dtype),
            force=force,
            shard_size=size,
        )
        found = summary.get("search")
        chosen = ""
        if found:
            c = found["chosen"]
            chosen = (
                f"; search chose L={c['layers']}, {c['step']} steps of "
                f"{found['fraction']:g} (held-out harmful rate {c['harmful_rate']:.3f}, "
                f"task {c['task']:.3f})"
            )
        typer.echo(
            f"wrote {output}: {summary.get('restored_total', '?')} weights restored "
            f"(kept step {summary.get('steps', '?')}){chosen}",
            err=True,
        )
