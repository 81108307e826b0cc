"""The model references of a recipe: where each resolves on disk, and why one cannot
be used (a missing folder, a LoRA adapter that cannot be read)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from weightops.io.lora import read_config, split_reference

if TYPE_CHECKING:
    from weightops.recipe import ModuleRecipe, Recipe


def resolve_model(ref: str, recipe_dir: Path | None = None) -> Path | None:
    """A model reference as a local path: relative to the working directory first (as
    mergekit does), then to the recipe's folder."""
    try:
        candidates = [Path(ref).expanduser()]
        if recipe_dir is not None and not Path(ref).is_absolute():
            candidates.append(recipe_dir / ref)
        return next((c for c in candidates if c.exists()), None)
    except (OSError, ValueError, RuntimeError):  # a name too long, a NUL, ~nobody
        return None


def reference_problems(ref: str, recipe_dir: Path) -> list[str]:
    """Why a model reference (MODEL, or MODEL+LORA_ADAPTER) cannot be used; [] if it can."""
    try:
        model, adapter = split_reference(ref)
    except ValueError as e:
        return [str(e)]
    if resolve_model(model, recipe_dir) is None:
        return [f"model {model!r} not found (no such folder or file)"]
    if adapter is None:
        return []
    folder = resolve_model(adapter, recipe_dir)
    if folder is None:
        return [f"LoRA adapter {adapter!r} not found (no such folder)"]
    return read_config(folder)[1]


def model_refs(recipe: Recipe) -> list[tuple[str, str]]:
    """(YAML path, reference) of every model the recipe names."""
    refs = []
    if recipe.base_model:
        refs.append(("base_model", recipe.base_model))
    parts: list[tuple[str, Recipe | ModuleRecipe]] = [("", recipe)]
    parts += [(f"modules.{name}.", m) for name, m in (recipe.modules or {}).items()]
    for at, part in parts:
        if at and part.base_model:
            refs.append((f"{at}base_model", part.base_model))
        for i, m in enumerate(part.models or []):
            refs.append((f"{at}models[{i}].model", m.model))
        for i, s in enumerate(part.slices or []):
            if s.base_model:
                refs.append((f"{at}slices[{i}].base_model", s.base_model))
            for j, src in enumerate(s.sources):
                refs.append((f"{at}slices[{i}].sources[{j}].model", src.model))
    if recipe.align is not None:
        refs.append(("align.to", recipe.align.to))
    return refs
