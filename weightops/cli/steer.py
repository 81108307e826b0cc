"""`weightops steer`: extract steering vectors, and bake them into checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from weightops.cli import _common
from weightops.cli._common import parse_size, user_errors

steer_app = typer.Typer(
    help="Steering vectors: extract from contrastive pairs, bake into weights.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """JSONL of {"positive": …, "negative": …}; errors name the line."""
    from weightops.io.jsonl import JsonlError, read_jsonl
    from weightops.steering import SteeringError

    try:
        rows = read_jsonl(path, what="pairs")
    except JsonlError as e:
        raise SteeringError(str(e)) from e
    pairs = []
    for n, row in rows:
        pair = (row.get("positive"), row.get("negative"))
        if not all(isinstance(t, str) for t in pair):
            raise SteeringError(
                f"{path}:{n}: expected a JSON object with 'positive' and 'negative' texts"
            )
        pairs.append(pair)
    if not pairs:
        raise SteeringError(f"{path}: no pairs (the file is empty)")
    return pairs  # type: ignore[return-value]


@steer_app.command("train")
def train(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model folder.", show_default=False),
    pairs: Path = typer.Option(..., "--pairs", help='JSONL of {"positive": …, "negative": …}.'),
    output: Path = typer.Option(..., "-o", "--output", help="Vector file (.safetensors or .gguf)."),
    method: str = typer.Option(
        "pca_diff", "--method", help="mean_diff, pca_diff, pca_center or probe."
    ),
    layers: str = typer.Option(
        "all", "--layers", help="all, auto (contrastive layer search), or e.g. 8,10,12."
    ),
    top: int = typer.Option(
        1, "--top", min=1, help="With --layers auto: how many of the best layers to keep."
    ),
) -> None:
    """Extract a steering vector from contrastive text pairs (read at the last token)."""
    with user_errors():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from weightops.demo import quiet_transformers
        from weightops.io.checkpoint import Checkpoint
        from weightops.steering import SteeringError, SteeringVector
        from weightops.steering.extract import search_layers

        quiet_transformers()
        data = read_pairs(pairs)
        Checkpoint(model)  # refuses pickled weights before transformers could unpickle them
        m = AutoModelForCausalLM.from_pretrained(model, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(model)
        chosen: list[int] | None = None
        if layers == "auto":
            ranking = search_layers(m, tok, data, method)
            for s in ranking:
                typer.echo(
                    f"layer {s.layer:3d}  held-out accuracy {s.accuracy:.2f}  margin {s.margin:.2f}",
                    err=True,
                )
            chosen = sorted(s.layer for s in ranking[:top])
        elif layers != "all":
            try:
                chosen = [int(x) for x in layers.split(",")]
            except ValueError:
                raise SteeringError(
                    f"--layers {layers!r}: give all, auto or numbers like 8,10,12"
                ) from None
        vec = SteeringVector.train(m, tok, data, method=method, layers=chosen)
        if output.suffix == ".gguf":
            vec.export_gguf(output)
        else:
            vec.save(output)
        typer.echo(f"wrote {output} ({method}, layers {vec.layers})", err=True)


def _load(vector: Path):
    from weightops.steering import SteeringVector

    return SteeringVector.load(vector)


@steer_app.command("bake")
def bake(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model folder.", show_default=False),
    vector: Path = typer.Option(..., "--vector", help="Steering vector (.safetensors or .gguf)."),
    strength: float = typer.Option(..., "--strength", help="Multiplier of the vector."),
    output: Path = typer.Option(..., "-o", "--output", help="Output model folder."),
    force: bool = _common.FORCE,
    shard_size: str = _common.SHARD_SIZE,
) -> None:
    """Bake `strength × vector` into the weights as an addition at every position (a
    bias on each steered block's MLP output projection). The output is an ordinary
    checkpoint that gives the same logits as the hooked model."""
    size = parse_size(shard_size)
    with user_errors():
        from weightops.steering.bake import bake_addition

        bake_addition(model, _load(vector), strength, output, force=force, shard_size=size)
        typer.echo(f"wrote {output}", err=True)


@steer_app.command("ablate")
def ablate(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model folder.", show_default=False),
    vector: Path = typer.Option(..., "--vector", help="Vector holding the direction to remove."),
    output: Path = typer.Option(..., "-o", "--output", help="Output model folder."),
    layer: int | None = typer.Option(
        None, "--layer", help="Which layer's direction (if the vector has several)."
    ),
    force: bool = _common.FORCE,
    shard_size: str = _common.SHARD_SIZE,
) -> None:
    """Remove a direction from the model (e.g. a refusal direction) by orthogonalising
    every matrix that writes to the residual stream against it."""
    size = parse_size(shard_size)
    with user_errors():
        from weightops.steering.bake import bake_ablation

        bake_ablation(model, _load(vector), output, layer=layer, force=force, shard_size=size)
        typer.echo(f"wrote {output}", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(steer_app, name="steer")
