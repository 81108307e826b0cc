"""The side files of a merge's output: config, generation config, tokenizer, model card."""

from __future__ import annotations

from pathlib import Path

from weightops import __version__
from weightops.engine.plan import Plan
from weightops.io import sidefiles


def write_side_files(plan: Plan, folder: Path) -> None:
    """Write everything but the weights into the output folder."""
    sidefiles.write_config(folder, plan.config)
    sidefiles.copy_generation_config(plan.config_source, folder)
    vocabulary = plan.vocab.vocabulary if plan.vocab else None
    if vocabulary is not None:
        tokenizer = sidefiles.save_tokenizer(vocabulary.tokenizer, folder, plan.chat_template)
        origin = (
            f"merged ({vocabulary.source}, {len(vocabulary.tokens)} tokens; the inputs' "
            "embedding rows were re-indexed to it)"
        )
    else:
        tokenizer = sidefiles.copy_tokenizer(plan.tokenizer_source, folder, plan.chat_template)
        origin = f"from `{plan.tokenizer_source}`"
    recipe = plan.recipe
    base = recipe.base_model
    inputs = [
        f"- `{p}`"
        + (
            f" with the LoRA adapter `{plan.adapters[i].folder}` merged in"
            if i in plan.adapters
            else ""
        )
        + (" (base)" if base and p.name == base.rstrip("/").split("/")[-1] else "")
        for i, p in enumerate(plan.models)
    ]
    reference = f" ({plan.method.reference})" if plan.method.reference else ""
    how = f"the `{plan.method.name}` method{reference}"
    if recipe.modules is not None:
        how = "one method per module: " + ", ".join(
            f"{key} `{recipe.module_view(key).merge_method}`" for key in recipe.modules
        )
    summary = [
        f"This model was made by merging {len(plan.models)} checkpoint(s) with {how}.",
        "",
        "## Inputs",
        "",
        *inputs,
        "",
        f"Tokenizer {origin}"
        + (f" ({', '.join(tokenizer)})." if tokenizer else " (no tokenizer files found)."),
    ]
    if plan.align is not None:
        summary += [
            "",
            f"Before merging, every input was permuted to match `{plan.align.reference}` "
            f"by weight matching (groups: {', '.join(plan.align.groups)}; seed "
            f"{plan.align.seed}).",
        ]
    title = f"{plan.method.name} merge of {', '.join(p.name for p in plan.models)}"
    sidefiles.write_card(
        folder, title=title, summary=summary, recipe_yaml=recipe.to_yaml(), version=__version__
    )
