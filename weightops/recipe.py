"""Recipes: mergekit's YAML format, validated strictly, every problem reported at once.

A recipe names a merge method, its input models (or layer slices of them, or — for a
multimodal model — `modules:`, each with its own inputs and optionally its own method
and base), parameters (scalars, gradients over depth, lists of `{filter, value}`
conditions, or — for the parameters a method declares as `Blocks` — a table of layer
ranges), dtypes and the tokenizer source. A model may be `MODEL+LORA_ADAPTER`
(weightops.io.lora). What mergekit runs, weightops runs: a key mergekit silently
ignores (a misspelt `densty`, a parameter the method does not take) is a warning
naming its YAML path and the closest valid name (weightops.recipe_keys and
weightops.recipe_checks), and an error with `strict`, so it cannot silently fall back
to a default. `load_recipe` parses and checks structure, method, parameters and model
paths, and raises one RecipeError listing every problem with its YAML path, before
any tensor is read.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, PositiveInt, PrivateAttr, ValidationError

from weightops.errors import RecipeError
from weightops.io.safe_read import load_yaml, read_recipe_text
from weightops.merge.registry import MethodSpec, all_methods, unknown_method_message
from weightops.recipe_refs import model_refs, reference_problems
from weightops.vocab.config import TokenizerSettings, check_tokenizer

Scalar = bool | int | float | str
DTypeName = Literal["float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(_Strict):
    value: Scalar | list[Scalar]
    filter: str | None = None


# A list of lists is a table (`Blocks` parameters: [[first_layer, last_layer, value], …]).
Setting = Scalar | list[Scalar] | list[list[Scalar]] | Condition | list[Condition]
Parameters = dict[str, Setting]
# (yaml path, message) pairs: the problems or warnings of a recipe.
Found = list[tuple[str, str]]


class ModelInput(_Strict):
    model: str
    parameters: Parameters | None = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class Slice(_Strict):
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Parameters | None = None


class AlignSettings(_Strict):
    """`align:` permutes every model's hidden units to match `to` before the merge
    (weight matching, see weightops.align); `to` itself stays as it is."""

    to: str
    groups: list[Literal["residual", "mlp", "heads"]] | None = None
    seed: int = 0
    max_rounds: PositiveInt = 100


class ModuleRecipe(_Strict):
    """`modules.<name>`: one part of a multimodal model (weightops.engine.modules) with
    its own inputs, and optionally its own method and base model."""

    models: list[ModelInput] | None = None
    slices: list[Slice] | None = None
    merge_method: str | None = None
    base_model: str | None = None
    parameters: Parameters | None = None


class Recipe(_Strict):
    merge_method: str
    models: list[ModelInput] | None = None
    slices: list[Slice] | None = None
    modules: dict[str, ModuleRecipe] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: str | None = None  # union, base or a model path (weightops.vocab)
    chat_template: str | None = None
    output: str | None = None
    align: AlignSettings | None = None
    tokenizer: TokenizerSettings | None = None
    _warnings: list[tuple[str, str]] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[tuple[str, str]]:
        """(yaml path, message) of every key mergekit would ignore."""
        return self._warnings

    @property
    def method(self) -> MethodSpec:
        return all_methods()[self.merge_method]

    def model_paths(self) -> list[str]:
        """Every referenced model, base first, each once, in recipe order."""
        paths = [self.base_model] if self.base_model else []
        for m in self.models or []:
            paths.append(m.model)
        for s in self.slices or []:
            if s.base_model:
                paths.append(s.base_model)
            paths.extend(src.model for src in s.sources)
        for name in self.modules or {}:
            paths.extend(self.module_view(name).model_paths())
        return list(dict.fromkeys(paths))

    def module_view(self, name: str) -> Recipe:
        """The recipe module `name` is merged by: its inputs; its own method and base
        model, or the top-level ones (the base only if its method uses one); the
        top-level parameters, when it uses the top-level method, else those its method
        declares, under its own parameters."""
        module = (self.modules or {})[name]
        method = module.merge_method or self.merge_method
        spec = all_methods().get(method)
        uses_base = spec is None or spec.base != "unused"
        inherited = {
            k: v
            for k, v in (self.parameters or {}).items()
            if method == self.merge_method or (spec is not None and k in spec.params)
        }
        return self.model_copy(
            update={
                "merge_method": method,
                "base_model": module.base_model or (self.base_model if uses_base else None),
                "models": module.models,
                "slices": module.slices,
                "parameters": {**inherited, **(module.parameters or {})} or None,
                "modules": None,
            }
        )

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True, mode="json")
        return yaml.safe_dump(data, sort_keys=False)


def evaluate(setting: Setting, tensor_name: str, t: float) -> Any:
    """The value of a parameter setting for one tensor at depth fraction t (0 … 1).

    A list of numbers is a gradient, interpolated linearly over depth; a list of other
    scalars picks an element; conditions apply the first whose filter is a substring of
    the tensor name (or is missing / "*"). Same semantics as mergekit. A table (a list of
    lists) is one value, the same for every tensor.
    """
    if _is_table(setting):
        return setting
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if isinstance(setting[0], Condition):
            for cond in setting:
                if cond.filter in (None, "*") or cond.filter in tensor_name:
                    return evaluate(cond.value, tensor_name, t)
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return setting


def _is_table(setting: Any) -> bool:
    return isinstance(setting, list) and bool(setting) and isinstance(setting[0], list)


def _literals(setting: Setting) -> list[Any]:
    if isinstance(setting, Condition):
        return _literals(setting.value)
    if isinstance(setting, list):
        return [v for s in setting for v in _literals(s)]
    return [setting]


_UNION_MEMBERS = ("bool", "int", "float", "str", "Condition")


def _yaml_path(loc: tuple[Any, ...]) -> tuple[str, bool]:
    """The YAML path of a pydantic error location, and whether it is a failure of a
    union (a parameter setting): pydantic then names each member it tried in the
    location, and the path stops before the first of them."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_MEMBERS or str(part).startswith(("list[", "tuple[", "dict[")):
            return out, True
        elif not str(part).startswith("function-"):
            out += f".{part}" if out else str(part)
    return out, False


def _pydantic_problems(err: ValidationError) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for e in err.errors():
        path, union = _yaml_path(e["loc"])
        if union:
            msg = "is not a setting: give a value, a list of values or {filter, value} conditions"
        else:
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        seen.setdefault(path, msg)
    return list(seen.items())


def parse_recipe(
    text: str, source: str = "recipe", *, recipe_dir: Path | None = None, strict: bool = False
) -> Recipe:
    """Parse YAML text into a Recipe, checking structure, method and parameters, and
    (with `recipe_dir`) that every model exists; one RecipeError lists every problem.
    What mergekit would ignore is kept in `Recipe.warnings`, or, with `strict`, is a
    problem too."""
    documents = load_documents(text, source)
    if len(documents) != 1:
        raise RecipeError(
            source,
            [("", f"holds {len(documents)} YAML documents; one recipe is one document")],
        )
    recipe, problems, warnings = check_mapping(documents[0], recipe_dir=recipe_dir)
    if strict:
        problems, warnings = problems + warnings, []
    if problems:
        raise RecipeError(source, problems, warnings=warnings)
    assert recipe is not None
    recipe._warnings = warnings
    return recipe


def load_documents(text: str, source: str) -> list[Any]:
    """The YAML documents of a recipe file (mergekit-multi puts several in one)."""
    try:
        found = load_yaml(
            text,
            source,
            error=lambda msg, hint=None: RecipeError(source, [("", msg)]),
            documents=True,
        )
        return [d for d in found if d is not None] or [None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise RecipeError(source, [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from e


def check_mapping(
    data: Any, *, recipe_dir: Path | None = None, outputs: frozenset[str] = frozenset()
) -> tuple[Recipe | None, Found, Found]:
    """(recipe or None, problems, warnings) of one recipe document. With `recipe_dir`
    every model must exist, except the `outputs` of earlier steps of a multi-document
    recipe."""
    from weightops.recipe_checks import check_table_depth
    from weightops.recipe_keys import ignored_keys

    if not isinstance(data, dict):
        return None, [("", "a recipe is a YAML mapping with merge_method, models, …")], []
    warnings: Found = []
    data = ignored_keys(data, warnings)
    problems: Found = []
    try:
        recipe: Recipe | None = Recipe.model_validate(data)
    except ValidationError as e:
        problems += _pydantic_problems(e)
        recipe = _without_unknown_keys(data, e)
    if recipe is not None:
        problems += check_recipe(recipe, warnings)
        if recipe_dir is not None:
            missing = [
                (where, msg)
                for where, ref in model_refs(recipe)
                if ref not in outputs
                for msg in reference_problems(ref, recipe_dir)
            ]
            if missing or recipe.modules is None:
                problems += missing or check_table_depth(recipe, recipe_dir)
    return recipe, problems, warnings


def _without_unknown_keys(data: dict[str, Any], err: ValidationError) -> Recipe | None:
    """The recipe with its unknown keys dropped, so that the other checks can still
    report their problems in the same run; None if it is broken in other ways too."""
    if any(e["type"] != "extra_forbidden" for e in err.errors()):
        return None
    data = copy.deepcopy(data)
    for e in err.errors():
        *parents, key = e["loc"]
        node: Any = data
        for part in parents:
            node = node[part]
        node.pop(key, None)
    try:
        return Recipe.model_validate(data)
    except ValidationError:
        return None


def load_recipe(path: str | Path, *, check_paths: bool = True, strict: bool = False) -> Recipe:
    """Read and fully validate a recipe file (model folders must exist)."""
    path = Path(path)
    return parse_recipe(
        read_recipe_text(path),
        str(path),
        recipe_dir=path.parent if check_paths else None,
        strict=strict,
    )


def check_recipe(
    recipe: Recipe, warnings: list[tuple[str, str]] | None = None
) -> list[tuple[str, str]]:
    """Every structural and parameter problem of a parsed recipe; what mergekit would
    ignore is appended to `warnings` (when given)."""
    from weightops.chat_templates import check_chat_template
    from weightops.recipe_checks import check_group, check_modules

    problems: list[tuple[str, str]] = []
    problems += check_tokenizer(recipe)
    if [recipe.models, recipe.slices, recipe.modules].count(None) != 2:
        problems.append(("", "give exactly one of 'models', 'slices' or 'modules'"))
    if recipe.align is not None and any("+" in ref for ref in recipe.model_paths()):
        problems.append(("align", "cannot be combined with LoRA adapter references (MODEL+LORA)"))
    problems += check_chat_template(recipe.chat_template)
    method = all_methods().get(recipe.merge_method)
    if method is None:
        problems.append(("merge_method", unknown_method_message(recipe.merge_method)))
        return problems
    found = warnings if warnings is not None else []
    if recipe.modules is not None:
        return problems + check_modules(recipe, found)
    return problems + check_group(method, recipe, found)
