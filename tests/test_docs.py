"""The README and recipes/ stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from weightops.merge import all_methods
from weightops.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_every_method_is_in_the_readme_table_with_its_parameters():
    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", readme, re.M)}
    assert set(rows) == set(all_methods())
    for name, spec in all_methods().items():
        params = rows[name].rsplit("|", 2)[-2]
        listed = {p.strip() for p in params.split(",")}
        if params.strip().startswith("as "):
            continue  # "as dare_linear": the same parameters as a listed method
        hidden = {"int8_mask", "seed"} - listed  # compatibility / engine parameters
        assert set(spec.params) - hidden <= listed | {"seed"}, name


def test_every_method_has_an_example_recipe_that_starts_with_its_command():
    names = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert set(all_methods()) <= names
    for path in (ROOT / "recipes").glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# weightops merge recipes/{path.name}"), path.name
        assert load_recipe(path, check_paths=False).merge_method == path.stem
