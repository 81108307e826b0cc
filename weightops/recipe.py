"""Recipes: mergekit's YAML format, validated strictly, every problem reported at once.

A recipe names a merge method, its input models (or layer slices of them), parameters
(scalars, gradients over depth, lists of `{filter, value}` conditions, or — for the
parameters a method declares as `Blocks` — a table of layer ranges), dtypes and
the tokenizer source. Unknown keys are errors: a misspelt `densty` must not silently
fall back to a default. `load_recipe` parses and checks structure, method, parameters
and model paths, and raises one RecipeError listing every problem with its YAML path,
before any tensor is read.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError

from weightops.arch import num_layers
from weightops.errors import RecipeError
from weightops.io.safe_read import load_yaml, read_recipe_text
from weightops.merge.registry import (
    Blocks,
    MethodSpec,
    ParamSpec,
    all_methods,
    unknown_method_message,
)

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


class Recipe(_Strict):
    merge_method: str
    models: list[ModelInput] | None = None
    slices: list[Slice] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    output: str | None = None
    align: AlignSettings | None = None
    # mergekit keys weightops knows but does not implement yet: refused with a reason.
    modules: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None

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
        return list(dict.fromkeys(paths))

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


def _yaml_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(
            ("function-", "list[", "tuple[", "dict[", "str", "bool", "int", "float")
        ):
            out += f".{part}" if out else str(part)
    return out


def _pydantic_problems(err: ValidationError) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for e in err.errors():
        path = _yaml_path(e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        # Union members each report a failure; one line per path is enough.
        seen.setdefault(path, msg)
    return list(seen.items())


def parse_recipe(text: str, source: str = "recipe", *, recipe_dir: Path | None = None) -> Recipe:
    """Parse YAML text into a Recipe, checking structure, method and parameters, and
    (with `recipe_dir`) that every model exists; one RecipeError lists every problem."""
    try:
        data = load_yaml(
            text, source, error=lambda msg, hint=None: RecipeError(source, [("", msg)])
        )
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise RecipeError(source, [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from e
    if not isinstance(data, dict):
        raise RecipeError(source, [("", "a recipe is a YAML mapping with merge_method, models, …")])
    problems: list[tuple[str, str]] = []
    try:
        recipe: Recipe | None = Recipe.model_validate(data)
    except ValidationError as e:
        problems += _pydantic_problems(e)
        recipe = _without_unknown_keys(data, e)
    if recipe is not None:
        problems += check_recipe(recipe)
        if recipe_dir is not None:
            missing = [
                (where, f"model {ref!r} not found (no such folder or file)")
                for where, ref in _model_refs(recipe)
                if resolve_model(ref, recipe_dir) is None
            ]
            problems += missing or _check_table_depth(recipe, recipe_dir)
    if problems:
        raise RecipeError(source, problems)
    assert recipe is not None
    return recipe


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


def load_recipe(path: str | Path, *, check_paths: bool = True) -> Recipe:
    """Read and fully validate a recipe file (model folders must exist)."""
    path = Path(path)
    text = read_recipe_text(path)
    return parse_recipe(text, str(path), recipe_dir=path.parent if check_paths else None)


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


def _model_refs(recipe: Recipe) -> list[tuple[str, str]]:
    refs = []
    if recipe.base_model:
        refs.append(("base_model", recipe.base_model))
    for i, m in enumerate(recipe.models or []):
        refs.append((f"models[{i}].model", m.model))
    for i, s in enumerate(recipe.slices or []):
        if s.base_model:
            refs.append((f"slices[{i}].base_model", s.base_model))
        for j, src in enumerate(s.sources):
            refs.append((f"slices[{i}].sources[{j}].model", src.model))
    if recipe.align is not None:
        refs.append(("align.to", recipe.align.to))
    return refs


def check_recipe(recipe: Recipe) -> list[tuple[str, str]]:
    """Every structural and parameter problem of a parsed recipe."""
    problems: list[tuple[str, str]] = []
    for key, why in (
        ("modules", "multi-module (vision/audio tower) merges are not supported yet"),
        ("tokenizer", "vocabulary merging is not supported yet; use tokenizer_source"),
    ):
        if getattr(recipe, key) is not None:
            problems.append((key, why))
    if recipe.tokenizer_source == "union":
        problems.append(
            (
                "tokenizer_source",
                "'union' (vocabulary merging) is not supported yet; use 'base' or a model path",
            )
        )
    if (recipe.models is None) == (recipe.slices is None):
        problems.append(("", "give exactly one of 'models' or 'slices'"))
    methods = all_methods()
    method = methods.get(recipe.merge_method)
    if method is None:
        problems.append(("merge_method", unknown_method_message(recipe.merge_method)))
        return problems
    groups = _input_groups(recipe)
    for where, base, inputs in groups:
        problems += _check_inputs(method, where, base, inputs)
    problems += _check_parameters(method, recipe)
    return problems


def _input_groups(recipe: Recipe) -> list[tuple[str, str | None, list[tuple[str, str]]]]:
    """(yaml path, base model, [(yaml path, model)]) for each group merged together."""
    if recipe.models is not None:
        return [
            (
                "models",
                recipe.base_model,
                [(f"models[{i}]", m.model) for i, m in enumerate(recipe.models)],
            )
        ]
    return [
        (
            f"slices[{i}]",
            s.base_model or recipe.base_model,
            [(f"slices[{i}].sources[{j}]", src.model) for j, src in enumerate(s.sources)],
        )
        for i, s in enumerate(recipe.slices or [])
    ]


def _check_inputs(
    method: MethodSpec, where: str, base: str | None, inputs: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    problems = []
    name = method.name
    if method.base == "required" and not base:
        problems.append(("base_model", f"{name} needs a base_model"))
    if method.base == "unused" and base and base not in [m for _, m in inputs]:
        problems.append(
            (
                "base_model",
                f"{name} does not use base_model; list the model under {where} with its parameters instead",
            )
        )
    others = [m for _, m in inputs if method.base == "unused" or m != base]
    if len(others) < method.min_models:
        need = method.min_models
        what = "besides base_model " if method.base != "unused" else ""
        problems.append(
            (
                where,
                f"{name} needs at least {need} model{'s' if need > 1 else ''} {what}(got {len(others)})",
            )
        )
    if method.max_models is not None and len(others) > method.max_models:
        what = "besides base_model " if method.base != "unused" else ""
        problems.append(
            (
                where,
                f"{name} takes at most {method.max_models} model {what}per tensor (got {len(others)})",
            )
        )
    return problems


def _check_values(spec: ParamSpec, setting: Setting, path: str) -> list[tuple[str, str]]:
    if spec.kind is Blocks:
        if not _is_table(setting):
            return [(path, f"{spec.name} must be a list of [first_layer, last_layer, value]")]
        _, msg = spec.validate(setting)
        return [(path, f"{spec.name}: {msg}")] if msg else []
    if _is_table(setting):
        return [(path, f"{spec.name} takes a value, a gradient or conditions, not a table")]
    problems = []
    for value in _literals(setting):
        if value is None and not spec.required:
            continue
        _, msg = spec.validate(value)
        if msg:
            problems.append((path, f"{spec.name} {msg} (got {value!r})"))
    return problems


def _check_parameters(method: MethodSpec, recipe: Recipe) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    valid = ", ".join(method.params) or "none"
    shared_blocks = [("parameters", recipe.parameters)] + [
        (f"slices[{i}].parameters", s.parameters) for i, s in enumerate(recipe.slices or [])
    ]
    for where, params in shared_blocks:
        for key, setting in (params or {}).items():
            spec = method.params.get(key)
            if spec is None:
                problems.append(
                    (f"{where}.{key}", f"{method.name} has no parameter {key!r} (valid: {valid})")
                )
            else:
                problems += _check_values(spec, setting, f"{where}.{key}")
    global_keys = set(recipe.parameters or {})
    for where, model, params, is_base in _per_model_blocks(recipe):
        for key, setting in (params or {}).items():
            spec = method.params.get(key)
            if spec is None:
                problems.append(
                    (f"{where}.{key}", f"{method.name} has no parameter {key!r} (valid: {valid})")
                )
            elif not spec.per_model:
                problems.append(
                    (
                        f"{where}.{key}",
                        f"{key} applies to the whole merge; put it under the top-level parameters",
                    )
                )
            else:
                problems += _check_values(spec, setting, f"{where}.{key}")
        if is_base:
            continue
        for spec in method.params.values():
            if (
                spec.per_model
                and spec.required
                and spec.name not in (params or {})
                and spec.name not in global_keys
            ):
                problems.append(
                    (
                        where,
                        f"{method.name} needs {spec.name!r} for model {model!r}",
                    )
                )
    for spec in method.params.values():
        in_slices = any(spec.name in (s.parameters or {}) for s in recipe.slices or [])
        if not spec.per_model and spec.required and spec.name not in global_keys and not in_slices:
            problems.append(("parameters", f"{method.name} needs parameter {spec.name!r}"))
    return problems


def _output_depth(recipe: Recipe, recipe_dir: Path) -> tuple[int, str] | None:
    """The merged model's decoder depth, from the lead model's config.json (or the
    slices' lengths), and what it was read from; None when it cannot be told."""
    if recipe.slices is not None:
        depth = sum(
            max(0, s.sources[0].layer_range[1] - s.sources[0].layer_range[0])
            for s in recipe.slices
            if s.sources
        )
        return depth, "the slices"
    uses_base = recipe.merge_method in all_methods() and recipe.method.base != "unused"
    lead = recipe.base_model if uses_base and recipe.base_model else None
    lead = lead or next((m.model for m in recipe.models or []), None)
    path = resolve_model(lead, recipe_dir) if lead else None
    if path is None:
        return None
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    depth = num_layers(data) if isinstance(data, dict) else 0
    return (depth, repr(lead)) if depth > 0 else None


def _check_table_depth(recipe: Recipe, recipe_dir: Path) -> list[tuple[str, str]]:
    """Tables naming layers the merged model does not have (a recipe written for a
    deeper model) are errors: those rows would silently apply to nothing."""
    if recipe.merge_method not in all_methods():
        return []
    tables = [
        (f"{where}.{key}", setting)
        for where, params in [("parameters", recipe.parameters)]
        + [(f"slices[{i}].parameters", s.parameters) for i, s in enumerate(recipe.slices or [])]
        for key, setting in (params or {}).items()
        if (spec := recipe.method.params.get(key)) is not None and spec.kind is Blocks
    ]
    if not tables:
        return []
    found = _output_depth(recipe, recipe_dir)
    if found is None:
        return []
    depth, source = found
    problems = []
    for path, setting in tables:
        table, _ = Blocks.parse(setting)
        if table is not None and table.last_layer >= depth:
            problems.append(
                (
                    path,
                    f"names layer {table.last_layer}, but {source} has {depth} layers "
                    f"(0-{depth - 1})",
                )
            )
    return problems


def _per_model_blocks(recipe: Recipe) -> list[tuple[str, str, Parameters | None, bool]]:
    """(yaml path, model, its parameters, is it the base of its group)."""
    uses_base = recipe.merge_method in all_methods() and recipe.method.base != "unused"
    blocks = []
    for i, m in enumerate(recipe.models or []):
        blocks.append(
            (
                f"models[{i}].parameters",
                m.model,
                m.parameters,
                uses_base and m.model == recipe.base_model,
            )
        )
    for i, s in enumerate(recipe.slices or []):
        base = s.base_model or recipe.base_model
        for j, src in enumerate(s.sources):
            blocks.append(
                (
                    f"slices[{i}].sources[{j}].parameters",
                    src.model,
                    src.parameters,
                    uses_base and src.model == base,
                )
            )
    return blocks
