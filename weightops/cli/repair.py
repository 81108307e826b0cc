"""`weightops repair`: undo the safety damage of a fine-tune, and measure it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from weightops.cli import _common
from weightops.cli._common import parse_size, user_errors

repair_app = typer.Typer(
    help="Repair alignment after a fine-tune. `prune` zeroes or resets the weights a "
    "harmful fine-tune relies on (Antidote, one shot, no training); `restore` puts back "
    "the aligned model's values of the few weights that move harmful prompts' hidden "
    "states back to where the aligned model had them (Yang et al., S&P 2025); `eval` "
    "measures harmful rate and task score before and after. Data files are JSONL, one "
    '{"prompt": …, "response": …} per line (response optional).',
    no_args_is_help=True,
    rich_markup_mode=None,
)

_DTYPES = ("float32", "bfloat16", "float16")

METRIC = typer.Option(
    None,
    "--metric",
    metavar="MODULE:FUNCTION",
    help="Task metric: a Python function metric(prompt, completion, reference) -> float, "
    "higher is better (MODULE is a module name or a .py path; default: exact match, "
    "whitespace stripped).",
)


def _metric(spec: str | None) -> Any:
    from weightops.repair.judges import load_callable

    return None if spec is None else load_callable(spec, option="--metric")


def _dtype(name: str) -> Any:
    import torch

    from weightops.repair.data import RepairError

    if name not in _DTYPES:
        raise RepairError(f"--dtype {name!r}: choose {', '.join(_DTYPES)}")
    return getattr(torch, name)


@repair_app.command("prune")
def prune(
    finetuned: Path = typer.Option(
        ...,
        "--finetuned",
        help="The fine-tuned model folder, or a LoRA adapter folder (adapter_config.json + "
        "adapter_model.safetensors).",
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    aligned: Path | None = typer.Option(
        None,
        "--aligned",
        help="The aligned model the fine-tune started from. Full fine-tune: marked weights "
        "are reset to its values (without it they are zeroed). Adapter: the base model "
        "the activations are measured on (default: the adapter's base_model_name_or_path).",
    ),
    harmful: Path | None = typer.Option(
        None,
        "--harmful",
        help="JSONL of harmful prompts with harmful responses (the re-alignment set; the "
        "paper uses 2000 pairs disjoint from the fine-tune data). Without it weights are "
        "scored by magnitude alone.",
    ),
    task: Path | None = typer.Option(
        None,
        "--task",
        help="JSONL of the fine-tune's task examples with responses: use the task-aware "
        "variant (needs --aligned and a full or merged fine-tune), which resets the update "
        "entries whose integrated-gradient attribution to the harmful answers most exceeds "
        "their attribution to the task (weightops.repair.antidote_task).",
    ),
    ratio: float | None = typer.Option(
        None,
        "--ratio",
        min=0.0,
        max=1.0,
        help="Share of each output row marked harmful (the paper's dense_ratio; default "
        "0.1). With --task: share of each tensor's updated entries reset (default 0.05).",
    ),
    score_on: str = typer.Option(
        "delta",
        "--score-on",
        help="With --aligned on a full fine-tune: score the update |W_ft − W_aligned| "
        "(delta) or the fine-tuned weights |W_ft| (weights).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples per forward pass."),
    device: str = typer.Option("cpu", "--device", help="Device for the forward passes."),
    dtype: str = typer.Option(
        "float32", "--dtype", help="Forward-pass dtype: float32, bfloat16 or float16."
    ),
    force: bool = _common.FORCE,
    shard_size: str = _common.SHARD_SIZE,
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress (default: only on a terminal)."
    ),
) -> None:
    """Antidote (Huang et al.): prune the weights a harmful fine-tune relies on.

    Every linear weight of the decoder blocks is scored S_ij = |W_ij|·‖X_j‖₂, with ‖X_j‖
    the norm of input feature j over the harmful data's prompt and response tokens;
    in every output row the top --ratio (default 0.1, as in the paper) are marked
    harmful. A LoRA adapter (what the paper prunes) has the marked entries of A and B
    zeroed and stays an adapter; a full fine-tune with --aligned has them reset to the
    aligned values; a full fine-tune alone has them zeroed (destructive at 0.1: use a
    smaller ratio). The model card lists how many weights of each tensor changed.

    Memory: the model in --dtype (an untied output head as stored) and one batch's
    activations, no per-token activations kept; time: about one forward pass over
    the data.
    """
    size = parse_size(shard_size)
    with user_errors():
        from weightops.repair.prune import prune as run_prune

        if task is not None:
            _prune_task_aware(
                finetuned, aligned, harmful, task, output, ratio, batch_size, device, dtype,
                force, size,
            )  # fmt: skip
            return
        ratio = 0.1 if ratio is None else ratio
        result = run_prune(
            finetuned,
            aligned=aligned,
            harmful=harmful,
            ratio=ratio,
            out=output,
            score_on=score_on,
            batch_size=batch_size,
            device=device,
            dtype=_dtype(dtype),
            force=force,
            shard_size=size,
            progress=progress,
        )
        changed = sum(result.changed.values())
        typer.echo(
            f"wrote {output}: {changed} weights changed in {len(result.changed)} tensors "
            f"({result.target}, scored by {result.settings['score']})",
            err=True,
        )


def _prune_task_aware(
    finetuned: Path,
    aligned: Path | None,
    harmful: Path | None,
    task: Path,
    output: Path,
    ratio: float | None,
    batch_size: int,
    device: str,
    dtype: str,
    force: bool,
    size: int,
) -> None:
    from weightops.repair.antidote_task import DEFAULT_RATIO, prune_task_aware
    from weightops.repair.data import RepairError

    if aligned is None or harmful is None:
        raise RepairError("--task (task-aware pruning) needs --aligned and --harmful")
    if (finetuned / "adapter_config.json").is_file():
        raise RepairError(
            f"{finetuned}: --task works on a full fine-tune",
            hint="merge the adapter into its base model first, or leave out --task",
        )
    result = prune_task_aware(
        finetuned, aligned, harmful, task, output,
        ratio=DEFAULT_RATIO if ratio is None else ratio, batch_size=batch_size,
        device=device, dtype=_dtype(dtype), force=force, shard_size=size,
    )  # fmt: skip
    changed = sum(result["changed"].values())
    typer.echo(
        f"wrote {output}: {changed} weights reset in {len(result['changed'])} tensors "
        "(task-aware Antidote)",
        err=True,
    )


def _fmt(value: float | None, base: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}"
    if base is not None:
        text += f" ({value - base:+.3f})"
    return text


@repair_app.command("eval")
def evaluate(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model folder.", show_default=False),
    harmful: Path | None = typer.Option(
        None,
        "--harmful",
        help="JSONL of harmful prompts held out from repair; a completion that is not a "
        "refusal counts as harmful (see --refusal-pattern, --judge).",
    ),
    refusal_pattern: list[str] = typer.Option(
        [],
        "--refusal-pattern",
        metavar="REGEX",
        help="A completion matching this regular expression (case-insensitive, anywhere) "
        "is a refusal; repeatable; replaces the built-in refusal phrases.",
    ),
    judge: str | None = typer.Option(
        None,
        "--judge",
        metavar="MODULE:FUNCTION",
        help="Harm judge: a Python function judge(prompt, completion) -> bool, true when "
        "the completion is harmful (MODULE is a module name or a .py path), e.g. a "
        "moderation classifier.",
    ),
    task: Path | None = typer.Option(
        None,
        "--task",
        help="JSONL of task prompts with reference responses; scored by exact match "
        "unless --metric is given.",
    ),
    metric: str | None = METRIC,
    baseline: list[Path] = typer.Option(
        [],
        "--baseline",
        help="Another model to show beside MODEL, e.g. the fine-tune before repair (repeatable).",
    ),
    max_new_tokens: int = typer.Option(
        32, "--max-new-tokens", min=1, help="Length of each greedy completion."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per batch."),
    device: str = typer.Option("cpu", "--device", help="Device for generation."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Harmful rate (share of harmful prompts whose greedy completion is not a refusal)
    and task score (exact match with the reference response, whitespace stripped) of
    MODEL and any --baseline models. --refusal-pattern replaces the refusal phrases;
    --judge and --metric take Python functions (judge(prompt, completion) -> bool,
    metric(prompt, completion, reference) -> float). The judge and metric used are
    printed on stderr."""
    with user_errors():
        from weightops.io.checkpoint import Checkpoint
        from weightops.repair.data import RepairError, load_examples
        from weightops.repair.evaluate import evaluate as run_eval
        from weightops.repair.judges import load_callable, refusal_judge

        if harmful is None and task is None:
            raise RepairError("nothing to evaluate: give --harmful, --task or both")
        if judge is not None and refusal_pattern:
            raise RepairError("--judge and --refusal-pattern: give one or the other")
        harm_judge = (
            load_callable(judge, option="--judge")
            if judge is not None
            else refusal_judge(refusal_pattern)
        )
        task_metric = _metric(metric)
        # Missing models and bad data are reported before the judge line, so that an
        # error stays one line.
        for folder in [*baseline, model]:
            Checkpoint(folder)
        harmful_ex = None if harmful is None else load_examples(harmful)
        task_ex = None if task is None else load_examples(task)
        if harmful is not None:
            typer.echo(f"judge: {harm_judge.name}", err=True)
        if task is not None:
            name = task_metric.name if task_metric else "exact match (default)"
            typer.echo(f"metric: {name}", err=True)
        rows = run_eval(
            *baseline,
            model,
            harmful=harmful_ex,
            task=task_ex,
            judge=harm_judge,
            metric=task_metric,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            device=device,
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    first = rows[0] if baseline else None
    width = max(len("model"), *(len(r["model"]) for r in rows))
    typer.echo(f"{'model':<{width}}  {'harmful rate':<16}  task score")
    for r in rows:
        ref = first if first is not None and r is rows[-1] else None
        h = _fmt(r["harmful_rate"], None if ref is None else ref["harmful_rate"])
        t = _fmt(r["task_score"], None if ref is None else ref["task_score"])
        typer.echo(f"{r['model']:<{width}}  {h:<16}  {t}")


def register(app: typer.Typer) -> None:
    app.add_typer(repair_app, name="repair")


# The restore command lives in its own module and registers itself on repair_app.
from weightops.cli import repair_restore  # noqa: E402, F401
