"""`weightops align`: permute a checkpoint's hidden units to match a reference."""

from __future__ import annotations

from pathlib import Path

import typer

from weightops.cli import _common
from weightops.cli._common import parse_size, user_errors


def align(
    model: Path = typer.Argument(
        ..., metavar="MODEL", help="Model folder to permute.", show_default=False
    ),
    to: Path = typer.Option(..., "--to", help="Reference model folder (left unchanged)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    groups: str = typer.Option(
        "residual,mlp,heads", "--groups", help="Which permutations to match, comma-separated."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random order of the groups."),
    max_rounds: int = typer.Option(
        100, "--max-rounds", min=1, help="Most rounds of coordinate ascent."
    ),
    force: bool = _common.FORCE,
    shard_size: str = _common.SHARD_SIZE,
    threads: int | None = _common.THREADS,
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar (default: only on a terminal)."
    ),
) -> None:
    """Permute MODEL's hidden units (residual stream, MLP units, attention heads) to
    match the --to reference by weight matching (Git Re-Basin), and write the result.

    The output computes the same function as MODEL; only the order of its units
    changes, so that a merge with the reference averages corresponding units. Tensors are
    streamed from both checkpoints; neither is loaded whole.

    Example:  weightops align ft_b --to ft_a -o ft_b-aligned
    """
    size = parse_size(shard_size)
    with user_errors():
        from weightops.align.model import align_model, describe_result
        from weightops.threads import intra_op_threads

        with intra_op_threads(threads):
            result = align_model(
                model,
                to,
                output,
                groups=groups,
                seed=seed,
                max_rounds=max_rounds,
                force=force,
                shard_size=size,
                progress=progress,
            )
        moved = sum(1 for v in result.moved.values() if v)
        typer.echo(
            f"wrote {output} ({moved} of {len(result.perms)} permutations changed)", err=True
        )
        for line in describe_result(result):
            typer.echo(line.removeprefix("- "), err=True)


def register(app: typer.Typer) -> None:
    app.command()(align)
