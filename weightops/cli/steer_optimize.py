"""`weightops steer optimize`: search an intervention's shape, print the Pareto front,
bake the chosen point."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import typer

from weightops.cli import _common
from weightops.cli._common import parse_size, user_errors
from weightops.cli.steer import DTYPE, _dtype, steer_app


def _prompts(path: Path, limit: int | None) -> list[str]:
    """The prompts of a JSONL file of {"prompt": …}; `limit` evenly spaced ones."""
    from weightops.repair.data import load_examples
    from weightops.steering.measure import evenly

    return evenly([ex.prompt for ex in load_examples(path)], limit)


def _scorer(spec: str | None):
    """--scorer module:function, a callable (prompt, completion) -> bool."""
    from weightops.steering import SteeringError

    if spec is None:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SteeringError(f"--scorer {spec!r}: write it as module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SteeringError(f"--scorer {spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise SteeringError(f"--scorer {spec!r} is not callable")
    return fn


def _write_study(path: Path, mode: str, baseline, trials: list, chosen: int | None) -> None:
    rows = [
        {
            "number": t.number,
            "behaviour": t.behaviour,
            "kl": t.kl,
            "seconds": t.seconds,
            "point": t.point.as_dict(),
        }
        for t in trials
    ]
    record = {"mode": mode, "baseline": baseline, "chosen": chosen, "trials": rows}
    path.write_text(json.dumps(record, indent=1))


@steer_app.command("optimize")
def optimize(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model folder.", show_default=False),
    target: Path = typer.Option(
        ...,
        "--target",
        help='JSONL of {"prompt": …} that show (or should show) the behaviour, e.g. harmful '
        "requests; the direction is read from them.",
    ),
    harmless: Path = typer.Option(
        ...,
        "--harmless",
        help="JSONL of harmless prompts: the other side, and where KL is measured.",
    ),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Bake the chosen point into this model folder."
    ),
    mode: str = typer.Option(
        "remove", "--mode", help="remove (e.g. undo refusal) or add (e.g. refuse more)."
    ),
    trials: int = typer.Option(50, "--trials", min=1, help="Points to try."),
    startup: int | None = typer.Option(
        None, "--startup", min=1, help="Random trials before TPE (default 30 % of --trials)."
    ),
    seed: int = typer.Option(0, "--seed"),
    scorer: str | None = typer.Option(
        None,
        "--scorer",
        help="module:function(prompt, completion) -> bool saying the completion shows the "
        "behaviour (default: the refusal phrase matcher).",
    ),
    eval_target: int | None = typer.Option(
        None, "--eval-target", min=1, help="Measure trials on this many target prompts."
    ),
    eval_harmless: int | None = typer.Option(
        None, "--eval-harmless", min=1, help="Measure KL on this many harmless prompts."
    ),
    max_new_tokens: int = typer.Option(
        12, "--max-new-tokens", min=1, help="Greedy tokens judged per target prompt."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    choose: str = typer.Option(
        "target",
        "--choose",
        help="target (lowest KL with behaviour ≤ --goal), knee, or trial:N.",
    ),
    goal: float = typer.Option(
        0.05, "--goal", min=0.0, max=1.0, help="With --choose target: the behaviour share to reach."
    ),
    study_file: Path | None = typer.Option(
        None, "--study", help="Write every trial (point, behaviour, KL) to this JSON file."
    ),
    dtype: str = DTYPE,
    force: bool = _common.FORCE,
    shard_size: str = _common.SHARD_SIZE,
) -> None:
    """Search which layers, weight profile over depth, direction source and writers
    (attention, MLP) remove or add a behaviour at the least KL on harmless prompts,
    with multi-objective TPE; print the Pareto front and bake the chosen point.

    In mode remove the last layer's direction is read after the final norm, as the
    output head sees it, and the first two trials are the full ablation and the late
    ablation (weight 1 on the last 40 % of layers, each its own direction)."""
    size = parse_size(shard_size)
    with user_errors():
        from weightops.repair.evaluate import load_model
        from weightops.steering import SteeringError
        from weightops.steering.bake import bake_point
        from weightops.steering.optimize import front_table
        from weightops.steering.optimize import optimize as run

        if mode not in ("remove", "add"):
            raise SteeringError(f"--mode {mode!r}: choose remove or add")
        judge = _scorer(scorer)
        if output is not None and not force and output.exists() and any(output.iterdir()):
            raise SteeringError(
                f"-o {output} exists and is not empty", hint="choose another folder or add --force"
            )
        out_dtype = _dtype(dtype)
        t_fit, h_fit = _prompts(target, None), _prompts(harmless, None)
        t_eval, h_eval = _prompts(target, eval_target), _prompts(harmless, eval_harmless)
        m, tok = load_model(model)

        done: list = []

        def show(t) -> None:
            typer.echo(
                f"trial {t.number:3d}  behaviour {t.behaviour:6.1%}  KL {t.kl:.4f}  ({t.seconds:.1f} s)",
                err=True,
            )
            done.append(t)
            if study_file is not None:
                # Written after every trial, so a stopped search keeps what it measured.
                _write_study(study_file, mode, None, done, None)

        study, dirs = run(
            m,
            tok,
            target_fit=t_fit,
            harmless_fit=h_fit,
            target_eval=t_eval,
            harmless_eval=h_eval,
            mode=mode,
            trials=trials,
            startup=startup,
            seed=seed,
            judge=judge,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            on_trial=show,
            goal=goal if choose == "target" else None,
        )
        chosen = study.choose(choose, goal)
        typer.echo(f"unedited: behaviour {study.baseline:.1%}")
        typer.echo(front_table(study, chosen))
        typer.echo(
            f"chosen: trial {chosen.number} (behaviour {chosen.behaviour:.1%}, KL {chosen.kl:.4f})"
        )
        if study_file is not None:
            _write_study(study_file, mode, study.baseline, study.trials, chosen.number)
        if output is not None:
            bake_point(
                model, chosen.point, dirs, output, dtype=out_dtype, force=force, shard_size=size
            )
            typer.echo(f"wrote {output}", err=True)
