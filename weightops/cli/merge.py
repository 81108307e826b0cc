"""`weightops merge`: run a recipe and write a Hugging Face checkpoint folder."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from weightops.cli import _common
from weightops.cli._common import fail, parse_size, print_warnings, user_errors


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
        "auto", "--device", help="auto, cpu or cuda[:N] (where the tensors are computed)."
    ),
    threads: int | None = _common.THREADS,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan, output size and peak memory; write nothing."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar (default: only on a terminal)."
    ),
    strict: bool = _common.STRICT,
    random_seed: int | None = typer.Option(
        None,
        "--random-seed",
        help="Seed of the random methods (dare_*, della*), in place of the recipe's `seed`.",
    ),
    numerics: str = typer.Option(
        "default",
        "--numerics",
        help="default: compute in fp32 (fp64 for dtype float64). mergekit: compute in the "
        "recipe's dtype in mergekit's order of operations, for its tensors bit for bit.",
    ),
    executor: str = _common.EXECUTOR,
    ray_address: str | None = _common.RAY_ADDRESS,
) -> None:
    """Merge the models of RECIPE into one checkpoint folder.

    The recipe uses mergekit's format (merge_method, base_model, models, slices or
    modules, parameters with gradients and filters, dtype, out_dtype, tokenizer_source
    or a tokenizer: block for vocabulary merging, MODEL+LORA references), so existing mergekit configs run unchanged; a key mergekit
    would ignore is a warning (an error with --strict). Several YAML documents in one
    file are run in order as mergekit-multi does: a document's `name:` names its output,
    later ones read it by that name, and the unnamed document is the final merge written
    to OUT. Tensors stream through one at a time: memory stays at a few tensors whatever
    the model size. The output appears only when complete; a failed or interrupted run
    leaves nothing behind.

    Example:  weightops merge recipes/ties.yaml -o merged-ties --shard-size 2GB
    """
    from weightops.engine.plan import build_plan
    from weightops.engine.run import RunOptions, execute, resolve_device
    from weightops.recipe_multi import load_recipe_file

    size = parse_size(shard_size)
    with user_errors():
        found = load_recipe_file(recipe, strict=strict)
        print_warnings(found.source, found.warnings)
        final = found.final
        named = final.recipe.output if final is not None else None
        out = output or (Path(named) if named else None)
        if out is None:
            raise fail("no output folder: pass -o OUT or set `output:` in the recipe")
        options = RunOptions(
            shard_size=size,
            device=device,
            threads=threads,
            force=force,
            progress=progress,
            executor=executor,
            ray_address=ray_address,
        )
        if found.multi:
            _merge_steps(found, out, recipe.parent, options, random_seed, numerics, dry_run)
            return
        plan = build_plan(
            found.steps[0].recipe, recipe.parent, random_seed=random_seed, numerics=numerics
        )
        if dry_run:
            plan.draws_in_blocks = resolve_device(device).type == "cpu"
            _print_plan(plan, out, options)
            return
        start = time.perf_counter()
        execute(plan, out, options)
        secs = time.perf_counter() - start
        typer.echo(
            f"wrote {out} ({len(plan.tasks)} tensors, {plan.output_bytes / 1e9:.2f} GB) in {secs:.1f}s",
            err=True,
        )


def _merge_steps(
    found,
    out: Path,
    recipe_dir: Path,
    options,
    random_seed: int | None,
    numerics: str,
    dry_run: bool,
) -> None:
    from weightops.engine.plan import build_plan
    from weightops.engine.run import resolve_device
    from weightops.engine.steps import run_steps

    if dry_run:
        on_cpu = resolve_device(options.device).type == "cpu"
        for step in found.steps:
            if step.name is None:
                where = str(out)
            elif found.final is None:
                where = str(out / step.name)
            else:
                where = f"intermediate {step.name!r}, removed at the end"
            typer.echo(f"# step {step.label} (document {step.document}) -> {where}")
            if step.needs:
                reads = ", ".join(repr(n) for n in step.needs)
                typer.echo(f"reads the output of {reads}; planned when that exists")
                typer.echo("")
                continue
            plan = build_plan(step.recipe, recipe_dir, random_seed=random_seed, numerics=numerics)
            plan.draws_in_blocks = on_cpu
            _print_plan(plan, where, options)
            typer.echo("")
        return
    start = time.perf_counter()

    def report(step, path: Path, plan) -> None:
        where = "an intermediate" if step.name and found.final else str(path)
        typer.echo(
            f"{step.label}: wrote {where} ({len(plan.tasks)} tensors, "
            f"{plan.output_bytes / 1e9:.2f} GB) after {time.perf_counter() - start:.1f}s",
            err=True,
        )

    run_steps(
        found, out, recipe_dir, options, random_seed=random_seed, numerics=numerics, report=report
    )


def _print_plan(plan, out: Path | str, options) -> None:
    from weightops.io.writer import plan_layout

    layout = plan_layout(
        [(t.name, t.shape, t.out_dtype) for t in plan.tasks], options.shard_size, {}
    )
    echo = typer.echo
    echo(f"method      {plan.method.name}")
    for key in plan.recipe.modules or {}:
        view = plan.recipe.module_view(key)
        base = f", base {view.base_model}" if view.base_model else ""
        echo(f"module      {key}: {view.merge_method}{base}")
    for i, path in enumerate(plan.models):
        adapter = plan.adapters.get(i)
        lora = (
            f" + LoRA {adapter.folder} ({len(adapter.deltas)} adapted, {len(adapter.replaced)} replaced)"
            if adapter
            else ""
        )
        echo(f"model {i:<5} {path}{lora}")
    echo(f"output      {out} ({len(layout.files)} shard{'s' if len(layout.files) > 1 else ''})")
    echo(f"tensors     {len(plan.tasks)}")
    echo(f"output size {plan.output_bytes / 1e9:.3f} GB")
    echo(
        f"peak memory {plan.peak_bytes(options.read_ahead_bytes, options.chunk_elements) / 1e9:.3f} GB "
        "(estimated tensor data: the largest piece in compute + read-ahead; the runtime adds ~0.3 GB)"
    )
    if any(m.observer for m in plan.methods.values()):
        echo("passes      2 (statistics, then merge)")
    if options.executor == "ray":
        from weightops.engine.distributed import UNITS_PER_SLOT, plan_units

        units = plan_units(plan, options)
        largest = max(u.peak_bytes for u in units) / 1e9
        echo(
            f"executor    ray: {len(units)} tasks, the largest asking for {largest:.3f} GB "
            f"(on a cluster of few CPUs the linear-time ones are merged into about "
            f"{UNITS_PER_SLOT} per task slot)"
        )
    template = plan.recipe.chat_template
    if template is not None:
        named = template if len(template) < 20 else "given in the recipe"
        found = "" if plan.chat_template else " (no input model has one: none written)"
        echo(f"chat template {named}{found}")
    for line in plan.vocab.summary if plan.vocab else []:
        echo(line)
    echo("")
    for task in plan.tasks:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in task.params if v is not None)
        what = "copy" if task.copy else plan.method_of(task).name
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
