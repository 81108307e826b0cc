"""`weightops validate`: check a recipe without reading any tensor."""

from __future__ import annotations

from pathlib import Path

import typer

from weightops.cli._common import user_errors


def validate(
    recipe: Path = typer.Argument(
        ..., metavar="RECIPE", help="Recipe YAML (mergekit format).", show_default=False
    ),
) -> None:
    """Check that every model folder exists, then the recipe's keys, method,
    parameters and their ranges, and everything `merge` checks before it starts: the
    inputs' headers, tensor names and shapes, layer ranges and each parameter's value
    at every tensor. Every problem is listed with its YAML path. Reads no tensor data."""
    from weightops.engine.plan import build_plan
    from weightops.recipe import load_recipe

    with user_errors():
        r = load_recipe(recipe)
        build_plan(r, recipe.parent)
        n = len(r.model_paths())
        typer.echo(f"{recipe}: ok ({r.merge_method}, {n} model{'s' if n != 1 else ''})")


def register(app: typer.Typer) -> None:
    app.command()(validate)
