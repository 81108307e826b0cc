"""What every command shares: error reporting and size parsing."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import typer

from weightops import signals
from weightops.errors import RecipeError, WeightopsError

DEBUG = False

# Options every command that writes a checkpoint folder takes, declared once.
FORCE = typer.Option(False, "--force", help="Replace an existing non-empty output folder.")
SHARD_SIZE = typer.Option("5GB", "--shard-size", help="Largest shard, e.g. 2GB or 500MiB.")
THREADS = typer.Option(
    None, "--threads", min=1, help="CPU threads for compute (default: torch's, one per core)."
)
STRICT = typer.Option(
    False,
    "--strict",
    help="Treat every recipe warning (a key mergekit would ignore) as an error.",
)
EXECUTOR = typer.Option(
    "local",
    "--executor",
    help="local: compute in this process. ray: one Ray task per tensor on a Ray cluster "
    "(needs `pip install 'weightops[ray]'`; inputs and output on a filesystem every node "
    "sees).",
)
RAY_ADDRESS = typer.Option(
    None,
    "--ray-address",
    help="With --executor ray: the cluster to join (e.g. auto). Default: RAY_ADDRESS, "
    "else a Ray instance started on this machine for the run.",
)

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; '512MiB' -> 536_870_912."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def print_warnings(source: str, warnings: list[tuple[str, str]]) -> None:
    """One line on stderr for each recipe key that has no effect."""
    for path, msg in warnings:
        typer.echo(f"warning: {source}: {path or '<recipe>'}: {msg}", err=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn WeightopsError into one line on stderr and exit 1, Ctrl-C into exit 130;
    with --debug the traceback is shown instead."""
    try:
        signals.raise_if_stopped()
        yield
        signals.raise_if_stopped()
    except RecipeError as e:
        if DEBUG:
            raise
        noun = "problem" if len(e.problems) == 1 else "problems"
        typer.echo(f"error: {e.source}: {len(e.problems)} {noun}", err=True)
        typer.echo(e.details(), err=True)
        print_warnings(e.source, e.warnings)
        raise typer.Exit(1) from None
    except WeightopsError as e:
        if DEBUG:
            raise
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        if DEBUG:
            raise
        typer.echo("interrupted: nothing was written", err=True)
        signals.told()
        raise typer.Exit(signals.stop_code() or 130) from None
    except MemoryError:
        if DEBUG:
            raise
        raise fail(
            "out of memory; try --device cpu, fewer --threads, or a machine with more RAM"
        ) from None
