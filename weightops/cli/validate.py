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
    folder exists. Every problem is listed with its YAML path. Reads no tensor data;
    with tokenizer settings, also reports the merged vocabulary and its embeddings."""
    from weightops.recipe import load_recipe

    with user_errors():
        r = load_recipe(recipe)
        n = len(r.model_paths())
        typer.echo(f"{recipe}: ok ({r.merge_method}, {n} model{'s' if n != 1 else ''})")
        if r.tokenizer is not None or r.tokenizer_source is not None:
            # The merged vocabulary needs the tokenizers and the tensor headers (no data).
            from weightops.engine.plan import build_plan

            vocab = build_plan(r, recipe.parent).vocab
            for line in vocab.summary if vocab else []:
                typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command()(validate)
