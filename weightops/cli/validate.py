"""`weightops validate`: check a recipe without reading any tensor."""

from __future__ import annotations

from pathlib import Path

import typer

from weightops.cli import _common
from weightops.cli._common import print_warnings, user_errors


def validate(
    recipe: Path = typer.Argument(
        ..., metavar="RECIPE", help="Recipe YAML (mergekit format).", show_default=False
    ),
    strict: bool = _common.STRICT,
) -> None:
    """Check a recipe: that every model folder exists, its keys, method, parameters and
    their ranges, and everything `merge` checks before it starts (the inputs' headers,
    tensor names and shapes, layer ranges and each parameter's value at every tensor).
    Every problem is listed with its YAML path, and every key that has no effect
    (mergekit would ignore it) as a warning; warnings fail only with --strict.
    Multi-document recipes are checked document by document. Reads no tensor data; with
    tokenizer settings, also reports the merged vocabulary and its embeddings."""
    from weightops.engine.plan import build_plan
    from weightops.recipe_multi import load_recipe_file

    with user_errors():
        found = load_recipe_file(recipe, strict=strict)
        print_warnings(found.source, found.warnings)
        if found.multi:
            steps = ", ".join(f"{s.name or 'final'} ({s.recipe.merge_method})" for s in found.steps)
            typer.echo(f"{recipe}: ok ({len(found.steps)} merges, in order: {steps})")
            return
        r = found.steps[0].recipe
        plan = build_plan(r, recipe.parent)
        n = len(r.model_paths())
        how = r.merge_method
        if r.modules is not None:
            how = ", ".join(f"{key} {r.module_view(key).merge_method}" for key in r.modules)
        typer.echo(f"{recipe}: ok ({how}, {n} model{'s' if n != 1 else ''})")
        for line in plan.vocab.summary if plan.vocab else []:
            typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command()(validate)
