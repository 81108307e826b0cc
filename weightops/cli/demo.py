"""`weightops demo`: build small checkpoints and merge them with a recipe from recipes/."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import typer

from weightops.cli._common import fail, user_errors


def recipes_dir() -> Path:
    """The example recipes: inside the installed package, or the source checkout's."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise fail("the example recipes are missing from this installation")


def demo(
    recipe: str = typer.Option(
        "ties", "--recipe", help="Example recipe to run: a name from recipes/."
    ),
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Keep models and output here (default: a temporary folder)."
    ),
    models_only: bool = typer.Option(
        False,
        "--models-only",
        help="Only write ./demo-models (or WORKDIR/demo-models) for running recipes/ by hand.",
    ),
) -> None:
    """Build a tiny Llama base and two fine-tunes, merge them with an example recipe,
    and load the result with transformers' from_pretrained.

    Every file in recipes/ runs on these models: `weightops demo --models-only` writes
    ./demo-models, then `weightops merge recipes/NAME.yaml -o OUT` from the same folder.
    """
    from weightops.demo import demo_models

    with user_errors():
        if models_only:
            root = workdir or Path.cwd()
            models = demo_models(root)
            typer.echo(f"wrote {', '.join(str(p) for p in models.values())}")
            return
        path = recipes_dir() / f"{recipe.removesuffix('.yaml')}.yaml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml")))
            raise fail(f"no example recipe {recipe!r}; choose one of: {names}")
        tmp = None
        if workdir is None:
            tmp = workdir = Path(tempfile.mkdtemp(prefix="weightops-demo-"))
        try:
            _run(path, workdir)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def _run(recipe_path: Path, workdir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightops.demo import demo_models
    from weightops.engine.plan import build_plan
    from weightops.engine.run import RunOptions, execute
    from weightops.recipe import load_recipe

    echo = typer.echo
    workdir.mkdir(parents=True, exist_ok=True)
    echo(f"1. building demo checkpoints in {workdir}/demo-models (tiny Llama: base, ft_a, ft_b)")
    demo_models(workdir)
    local = workdir / recipe_path.name
    shutil.copy(recipe_path, local)
    echo(f"2. merging with {recipe_path.name}:")
    echo(
        "   " + "\n   ".join(line for line in recipe_path.read_text().splitlines() if line.strip())
    )
    recipe = load_recipe(local)
    out = workdir / "merged"
    plan = build_plan(recipe, workdir)
    execute(plan, out, RunOptions(force=True))
    echo(f"3. wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("weightops", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    n = sum(p.numel() for p in model.parameters())
    echo(
        f"4. from_pretrained: {type(model).__name__}, {n:,} parameters; "
        f"logits {list(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}"
    )
    echo("ok: the merged folder is an ordinary Hugging Face checkpoint")


def register(app: typer.Typer) -> None:
    app.command()(demo)
