"""`weightops ama-search`: learn per-layer model-averaging ratios (Adaptive Model
Averaging) and write them as a `weightops merge` recipe."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from weightops.cli._common import user_errors

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def ama_search(
    pre: Path = typer.Option(..., "--pre", help="The model before RLHF (SFT), θ_pre."),
    post: Path = typer.Option(..., "--post", help="The model after RLHF, θ_post."),
    data: Path = typer.Option(
        ...,
        "--data",
        help='Preference data, JSONL of {"prompt": …, "chosen": …} (or "response"); '
        "the chosen responses' LM loss is what the search lowers.",
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Recipe to write (ratios.yaml)."),
    groups: str = typer.Option(
        "layer",
        "--groups",
        help="One ratio per: layer, block3 (the paper's three blocks) or blockN "
        "(N equal blocks, e.g. block4).",
    ),
    budget: float = typer.Option(
        0.2, "--budget", help="Mean share of θ_pre over the groups, in (0, 1]."
    ),
    eps: float = typer.Option(0.2, "--eps", help="Bounds how far the ratios spread (> 0)."),
    reg: float = typer.Option(1e-4, "--reg", help="L1 pull of every ratio towards the budget."),
    lr: float = typer.Option(0.01, "--lr", help="Adam learning rate of the group logits."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Passes over the data."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Examples per step."),
    max_length: int = typer.Option(
        512, "--max-length", min=2, help="Tokens per example (prompt + response)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order."),
    others: str = typer.Option(
        "pre",
        "--others",
        help="Tensors other than linear-projection weights: pre (from θ_pre, as the "
        "paper's code), alpha (blended too) or post.",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="Load dtype: auto (the checkpoint's), float32, bfloat16."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing recipe file."),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress line (default: on a terminal only)."
    ),
) -> None:
    """Learn how much of the pre-RLHF model each group of layers keeps (Adaptive Model
    Averaging, Lin et al.) at a fixed mean ratio, with the weights frozen, and write the
    ratios as a runnable `weightops merge` recipe (model_averaging with blocks)."""
    with user_errors():
        import torch

        from weightops.ama import AMAError, search

        if dtype not in _DTYPES:
            raise AMAError(f"--dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
        if output.exists() and not force:
            raise AMAError(f"{output} exists", hint="pass --force to replace it")
        result = search(
            pre,
            post,
            data=data,
            groups=groups,
            budget=budget,
            eps=eps,
            reg=reg,
            lr=lr,
            epochs=epochs,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
            others=others,
            device=device,
            dtype=None if dtype == "auto" else getattr(torch, dtype),
            progress=progress,
        )
        command = "weightops " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
        if command is None or "ama-search" not in command:
            command = f"weightops ama-search --pre {pre} --post {post} --data {data} -o {output}"
        result.save_recipe(output, pre, post, command)
        first, last = result.history[0], result.history[-1]
        typer.echo(
            f"{len(result.history)} steps, loss {first.objective:.4f} -> {last.objective:.4f}; "
            f"ratios {min(result.ratios):.3f}…{max(result.ratios):.3f} "
            f"(mean {sum(result.ratios) / len(result.ratios):.4f})",
            err=True,
        )
        if result.clamped:
            typer.echo("note: some ratios exceeded 1 and were written as 1", err=True)
        typer.echo(f"wrote {output}; run: weightops merge {output} -o merged-ama", err=True)


def register(app: typer.Typer) -> None:
    app.command("ama-search")(ama_search)
