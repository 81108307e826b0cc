"""The `weightops` command: one typer app, one module per command."""

from __future__ import annotations

import os
import sys

import typer

from weightops import signals
from weightops.cli import (
    _common,
    align,
    ama,
    demo,
    inspect,
    merge,
    quantize,
    repair,
    steer,
    validate,
)

app = typer.Typer(
    name="weightops",
    help="Weight-space alignment tooling for LLM checkpoints: streaming merges "
    "(mergekit recipes run unchanged), permutation alignment, AMA ratio search, "
    "steering vectors, alignment repair and 2/4-bit quantization, on Hugging Face "
    "safetensors checkpoint folders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _common.DEBUG = debug


for module in (merge, validate, inspect, demo, steer, quantize, align, ama, repair):
    module.register(app)


def main() -> None:
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        # A stop that came outside a command's own handling of it.
        code = 130
    except Exception as e:
        if signals.stop_code() is not None and not _common.DEBUG:
            # An interrupt some library swallowed (one landing mid-import leaves a
            # half-loaded module behind) surfaces later as an unrelated error: the
            # stop is what happened, and it is reported below.
            code = 1
        elif _common.DEBUG:
            raise
        else:
            # A failure no check foresaw: still one line, and the way to the details.
            typer.echo(
                f"error: internal error: {type(e).__name__}: {e} "
                "(run with --debug for the traceback, and please report it)",
                err=True,
            )
            code = 1
    stopped = signals.stop_code()
    if stopped is not None:
        # typer turns an interrupt into a silent exit 130; a stop also wins over
        # whatever status the command ended with, so it never reads as success.
        if signals.untold():
            typer.echo("interrupted", err=True)
        code = stopped
    # Everything is written and closed by now; skipping the interpreter's teardown
    # (unloading torch alone takes ~0.4 s) makes every command return that much sooner.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
