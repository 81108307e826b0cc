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
    """Check a recipe: keys, method, parameters and their ranges, and that every model
    folder exists. Every problem is listed with its YAML path. Reads no tensor."""
    from weightops.recipe import load_recipe

    with user_errors():
        r = load_recipe(recipe)
        n = len(r.model_paths())
        how = r.merge_method
        if r.modules is not None:
            how = ", ".join(f"{key} {r.module_view(key).merge_method}" for key in r.modules)
        typer.echo(f"{recipe}: ok ({how}, {n} model{'s' if n != 1 else ''})")


def register(app: typer.Typer) -> None:
    app.command()(validate)
