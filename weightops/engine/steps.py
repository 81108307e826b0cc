"""Running a multi-document recipe: each step's merge in order, as one output.

Steps with a name write to a folder of that name; a later step reading the name gets
that folder. With a final (unnamed) step, the named ones are intermediate: they are
built in a hidden folder beside the output (`.OUT.weightops-steps.weightops-tmp-PID`)
and removed when the run ends, whether it succeeded or not, so only the final model
appears at OUT. When every step is named, OUT holds them all (`OUT/NAME`), built in OUT's
staging folder and renamed into place at the end. Either way OUT appears only when
every step is complete; a failure or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from weightops.engine.plan import Plan, build_plan
from weightops.engine.run import RunOptions, execute
from weightops.io.writer import StagingFolder
from weightops.recipe_multi import RecipeFile, Step, with_outputs


def run_steps(
    found: RecipeFile,
    out: Path,
    recipe_dir: Path,
    options: RunOptions,
    *,
    random_seed: int | None = None,
    numerics: str = "default",
    report: Callable[[Step, Path, Plan], None] = lambda step, path, plan: None,
) -> None:
    """Run every step of `found` in order (see the module for where each goes)."""
    final = found.final
    # An existing OUT is refused now, not when the final step starts after the others.
    holder = StagingFolder(out, force=options.force)
    if final is not None:
        holder = StagingFolder(out.parent / f"{out.name}.weightops-steps", force=True)
    inner = dataclasses.replace(options, force=False)
    outputs: dict[str, Path] = {}
    try:
        holder.create()
        for step in found.steps:
            plan = build_plan(
                with_outputs(step.recipe, outputs),
                recipe_dir,
                random_seed=random_seed,
                numerics=numerics,
            )
            # The model card and shard metadata record the recipe as written, with
            # step names, not the temporary folders they stood for.
            plan.recipe = step.recipe
            if step.name is None:
                execute(plan, out, options)
                report(step, out, plan)
                continue
            path = (holder.path / step.name).resolve()
            execute(plan, path, inner)
            outputs[step.name] = path
            report(step, path if final is not None else out / step.name, plan)
        if final is None:
            holder.commit()
    finally:
        if final is not None or holder.path.exists():
            holder.discard()
