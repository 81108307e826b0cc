"""Multi-document recipes (mergekit-multi): several merges in one file, run in order.

Each YAML document is a recipe; a document's `name:` names its output, and later
documents (or earlier ones: the order is worked out from what each reads) use that
output by writing the name where a model goes (`base_model`, `models[].model`,
slice sources, `tokenizer_source`, `align.to`). At most one document has no name: it
is the final merge, written to the output folder. When every document is named,
there is no single final merge and the output folder holds each one under its name,
as mergekit-multi's intermediate directory does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightops.errors import RecipeError
from weightops.recipe import (
    Found,
    Recipe,
    check_mapping,
    load_documents,
    read_recipe_text,
)


@dataclass(frozen=True)
class Step:
    """One document: its name (None for the final merge), its recipe, and the names
    of the steps whose outputs it reads."""

    name: str | None
    recipe: Recipe
    needs: tuple[str, ...] = ()
    document: int = 1

    @property
    def label(self) -> str:
        return repr(self.name) if self.name else "final merge"


@dataclass
class RecipeFile:
    """The steps of a recipe file, in the order they run (one for a plain recipe)."""

    source: str
    steps: list[Step]
    warnings: Found = field(default_factory=list)

    @property
    def multi(self) -> bool:
        return len(self.steps) > 1 or self.steps[0].name is not None

    @property
    def final(self) -> Step | None:
        return next((s for s in self.steps if s.name is None), None)


def load_recipe_file(path: str | Path, *, strict: bool = False) -> RecipeFile:
    """Read and validate a recipe file of one or several documents; one RecipeError
    lists every problem of every document (and, with `strict`, every warning)."""
    path = Path(path)
    source = str(path)
    documents = load_documents(read_recipe_text(path), source)
    problems: Found = []
    warnings: Found = []
    if len(documents) == 1:
        recipe, problems, warnings = check_mapping(documents[0], recipe_dir=path.parent)
        steps = [Step(None, recipe)] if recipe is not None else []
    else:
        steps = _documents(documents, path.parent, problems, warnings)
    if strict:
        problems, warnings = problems + warnings, []
    if problems:
        raise RecipeError(source, problems, warnings=warnings)
    return RecipeFile(source, steps, warnings)


def _where(i: int, name: str | None, path: str) -> str:
    return f"document {i + 1}" + (f" ({name})" if name else "") + (f": {path}" if path else "")


def _name(doc: Any, i: int, problems: Found) -> str | None:
    if not isinstance(doc, dict) or doc.get("name") is None:
        return None
    name = doc["name"]
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        problems.append((_where(i, None, "name"), f"{name!r} is not a usable folder name"))
        return None
    return name


def _documents(docs: list[Any], recipe_dir: Path, problems: Found, warnings: Found) -> list[Step]:
    names = [_name(doc, i, problems) for i, doc in enumerate(docs)]
    seen: dict[str | None, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            what = f"the name {name!r}" if name else "no name (the final merge)"
            problems.append(
                (
                    _where(i, name, "name" if name else ""),
                    f"document {seen[name] + 1} has {what} too",
                )
            )
        seen.setdefault(name, i)
    outputs = frozenset(n for n in names if n)
    steps: list[Step] = []
    for i, (doc, name) in enumerate(zip(docs, names, strict=True)):
        body = {k: v for k, v in doc.items() if k != "name"} if isinstance(doc, dict) else doc
        recipe, found, ignored = check_mapping(body, recipe_dir=recipe_dir, outputs=outputs)
        problems.extend((_where(i, name, p), m) for p, m in found)
        warnings.extend((_where(i, name, p), m) for p, m in ignored)
        if recipe is not None and name is not None and recipe.output is not None:
            warnings.append(
                (_where(i, name, "output"), "has no effect: a named document's output is its name")
            )
        if recipe is not None:
            needs = tuple(r for r in dict.fromkeys(references(recipe)) if r in outputs)
            steps.append(Step(name, recipe, needs, i + 1))
    return _in_order(steps, problems)


def references(recipe: Recipe) -> list[str]:
    """Every place a model is named, as mergekit-multi patches them."""
    refs = list(recipe.model_paths())
    if recipe.tokenizer_source:
        refs.append(recipe.tokenizer_source)
    if recipe.align is not None:
        refs.append(recipe.align.to)
    return refs


def _in_order(steps: list[Step], problems: Found) -> list[Step]:
    """Steps ordered so each runs after those it reads, otherwise in document order."""
    present = {s.name for s in steps}
    done: list[Step] = []
    waiting = list(steps)
    while waiting:
        finished = {d.name for d in done}
        runnable = [s for s in waiting if all(n in finished or n not in present for n in s.needs)]
        if not runnable:
            cycle = ", ".join(s.label for s in waiting)
            problems.append(("", f"these documents read each other's outputs in a circle: {cycle}"))
            return done
        done.append(runnable[0])
        waiting.remove(runnable[0])
    return done


def with_outputs(recipe: Recipe, outputs: dict[str, Path]) -> Recipe:
    """The recipe with each step name it reads replaced by that step's output folder."""
    data = recipe.model_dump()

    def swap(node: dict[str, Any], key: str) -> None:
        if isinstance(node.get(key), str) and node[key] in outputs:
            node[key] = str(outputs[node[key]])

    swap(data, "base_model")
    swap(data, "tokenizer_source")
    for m in data.get("models") or []:
        swap(m, "model")
    for s in data.get("slices") or []:
        swap(s, "base_model")
        for src in s["sources"]:
            swap(src, "model")
    if data.get("align"):
        swap(data["align"], "to")
    return Recipe.model_validate(data)
