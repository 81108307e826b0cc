"""`weightops merge`: run a recipe and write a Hugging Face checkpoint folder."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from weightops.cli import _common
from weightops.cli._common import fail, parse_size, user_errors


def merge(
    recipe: Path = typer.Argument(
        ..., metavar="RECIPE", help="Recipe YAML (mergekit format).", show_default=False
    ),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Output folder (default: the recipe's `output:` key)."
    ),
    shard_size: str = _common.SHARD_SIZE,
    force: bool = _common.FORCE,
    device: str = typer.Option(
        "auto", "--device", help="auto, cpu or cuda[:N]; compute is fp32 there."
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for compute."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan, output size and peak memory; write nothing."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar (default: only on a terminal)."
    ),
) -> None:
    """Merge the models of RECIPE into one checkpoint folder.

    The recipe uses mergekit's format (merge_method, base_model, models or slices,
    parameters with gradients and filters, dtype, out_dtype, tokenizer_source or a
    tokenizer: block for vocabulary merging), so existing mergekit configs run
    unchanged. Tensors stream through one at a time: memory stays at a few tensors
    whatever the model size. The output appears only when complete; a failed or
    interrupted run leaves nothing behind.

    Example:  weightops merge recipes/ties.yaml -o merged-ties --shard-size 2GB
    """
    from weightops.engine.plan import build_plan
    from weightops.engine.run import RunOptions, execute, resolve_device
    from weightops.recipe import load_recipe

    size = parse_size(shard_size)
    with user_errors():
        r = load_recipe(recipe)
        out = output or (Path(r.output) if r.output else None)
        if out is None:
            raise fail("no output folder: pass -o OUT or set `output:` in the recipe")
        plan = build_plan(r, recipe.parent)
        options = RunOptions(
            shard_size=size, device=device, threads=threads, force=force, progress=progress
        )
        if dry_run:
            resolve_device(device)
            _print_plan(plan, out, options)
            return
        start = time.perf_counter()
        execute(plan, out, options)
        secs = time.perf_counter() - start
        typer.echo(
            f"wrote {out} ({len(plan.tasks)} tensors, {plan.output_bytes / 1e9:.2f} GB) in {secs:.1f}s",
            err=True,
        )


def _print_plan(plan, out: Path, options) -> None:
    from weightops.io.writer import plan_layout

    layout = plan_layout(
        [(t.name, t.shape, t.out_dtype) for t in plan.tasks], options.shard_size, {}
    )
    echo = typer.echo
    echo(f"method      {plan.method.name}")
    for i, path in enumerate(plan.models):
        echo(f"model {i:<5} {path}")
    echo(f"output      {out} ({len(layout.files)} shard{'s' if len(layout.files) > 1 else ''})")
    echo(f"tensors     {len(plan.tasks)}")
    echo(f"output size {plan.output_bytes / 1e9:.3f} GB")
    echo(
        f"peak memory {plan.peak_bytes(options.read_ahead_bytes, options.chunk_elements) / 1e9:.3f} GB "
        "(estimated tensor data: the largest piece in compute + read-ahead; the runtime adds ~0.3 GB)"
    )
    if plan.method.observer:
        echo("passes      2 (statistics, then merge)")
    for line in plan.vocab.summary if plan.vocab else []:
        echo(line)
    echo("")
    for task in plan.tasks:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in task.params if v is not None)
        what = "copy" if task.copy else plan.method.name
        echo(
            f"{task.name}  {list(task.shape)} {str(task.out_dtype).removeprefix('torch.')}  {what}({params})"
        )


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def register(app: typer.Typer) -> None:
    app.command()(merge)
