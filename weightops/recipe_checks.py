"""Checks of a parsed recipe against its merge method: inputs, parameters, table depth.

Each check returns problems (errors) and, where mergekit would run the recipe and
silently ignore part of it, warnings: a parameter the method does not take, a
whole-merge parameter given under one model (mergekit reads those only from the
top-level or slice `parameters`), parameters of the base model (methods that use a
base ignore its own weights). Both are (yaml path, message) pairs.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from weightops.arch import num_layers
from weightops.merge.registry import Blocks, MethodSpec, ParamSpec, all_methods
from weightops.recipe import (
    Found,
    Parameters,
    Recipe,
    Setting,
    _is_table,
    _literals,
)
from weightops.recipe_refs import resolve_model


def closest(key: str, valid: Iterable[str]) -> str:
    """'; did you mean X?' for the nearest valid name, else the valid names listed."""
    valid = list(valid)
    match = difflib.get_close_matches(key, valid, n=1)
    if match:
        return f"; did you mean {match[0]!r}?"
    return f" (valid: {', '.join(valid) or 'none'})"


def input_groups(recipe: Recipe) -> list[tuple[str, str | None, list[tuple[str, str]]]]:
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


def check_inputs(
    method: MethodSpec, where: str, base: str | None, inputs: list[tuple[str, str]]
) -> Found:
    problems = []
    name = method.name
    if method.base == "required" and not base:
        problems.append(("base_model", f"{name} needs a base_model"))
    others = [m for _, m in inputs if method.base == "unused" or m != base]
    if method.base == "unused" and base and base not in others:
        # As in mergekit: one more input, with default parameters.
        others.append(base)
    what = "besides base_model " if method.base != "unused" else ""
    if len(others) < method.min_models:
        need = method.min_models
        problems.append(
            (
                where,
                f"{name} needs at least {need} model{'s' if need > 1 else ''} {what}(got {len(others)})",
            )
        )
    if method.max_models is not None and len(others) > method.max_models:
        problems.append(
            (
                where,
                f"{name} takes at most {method.max_models} model {what}per tensor (got {len(others)})",
            )
        )
    return problems


def _check_values(spec: ParamSpec, setting: Setting, path: str) -> Found:
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


def _unknown(method: MethodSpec, key: str) -> str:
    return f"has no effect: {method.name} takes no parameter {key!r}" + closest(key, method.params)


def check_parameters(method: MethodSpec, recipe: Recipe) -> tuple[Found, Found]:
    """(problems, warnings) of every `parameters` block, as mergekit reads them: shared
    blocks (top level, slices) hold whole-merge parameters and fallbacks for per-model
    ones; a model's block holds only per-model parameters."""
    problems: Found = []
    warnings: Found = []
    shared_blocks = [("parameters", recipe.parameters)] + [
        (f"slices[{i}].parameters", s.parameters) for i, s in enumerate(recipe.slices or [])
    ]
    for where, params in shared_blocks:
        for key, setting in (params or {}).items():
            spec = method.params.get(key)
            if spec is None:
                warnings.append((f"{where}.{key}", _unknown(method, key)))
            else:
                problems += _check_values(spec, setting, f"{where}.{key}")
    global_keys = set(recipe.parameters or {})
    for where, model, params, is_base in per_model_blocks(recipe):
        for key, setting in (params or {}).items():
            spec = method.params.get(key)
            path = f"{where}.{key}"
            if is_base:
                warnings.append(
                    (
                        path,
                        f"has no effect: {method.name} does not read the base model's parameters",
                    )
                )
            elif spec is None:
                warnings.append((path, _unknown(method, key)))
            elif not spec.per_model:
                warnings.append(
                    (
                        path,
                        f"has no effect: {method.name} reads {key!r} for the whole merge, from "
                        f"the top-level or slice parameters; did you mean 'parameters.{key}'?",
                    )
                )
            else:
                problems += _check_values(spec, setting, path)
        if is_base:
            continue
        for spec in method.params.values():
            if (
                spec.per_model
                and spec.required
                and spec.name not in (params or {})
                and spec.name not in global_keys
            ):
                problems.append((where, f"{method.name} needs {spec.name!r} for model {model!r}"))
    for spec in method.params.values():
        in_slices = any(spec.name in (s.parameters or {}) for s in recipe.slices or [])
        if not spec.per_model and spec.required and spec.name not in global_keys and not in_slices:
            problems.append(("parameters", f"{method.name} needs parameter {spec.name!r}"))
    return problems, warnings


def per_model_blocks(recipe: Recipe) -> list[tuple[str, str, Parameters | None, bool]]:
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


def check_together(method: MethodSpec, recipe: Recipe) -> Found:
    """The method's `check` on each model's parameters, where they are plain values;
    gradients and conditions vary by tensor and are checked while planning."""
    if method.check is None or recipe.models is None:
        return []
    shared = recipe.parameters or {}
    problems = []
    for where, _, params, is_base in per_model_blocks(recipe):
        if is_base:
            continue
        values: dict[str, Any] = {}
        for spec in method.params.values():
            own = (params or {}).get(spec.name) if spec.per_model else None
            setting = shared.get(spec.name) if own is None else own
            value, msg = (spec.default, None) if setting is None else spec.validate(setting)
            if msg or not isinstance(value, (bool, int, float, str)):
                break  # missing, invalid (reported above) or varying by tensor
            values[spec.name] = [value] if spec.per_model else value
        else:
            if msg := method.check(values):
                problems.append((where, msg))
    return problems


def check_group(method: MethodSpec, recipe: Recipe, warnings: Found) -> Found:
    """The problems of one merge (the recipe's, or a module's view of it): inputs and
    parameters; what mergekit ignores goes to `warnings`."""
    problems: Found = []
    for where, base, inputs in input_groups(recipe):
        problems += check_inputs(method, where, base, inputs)
    listed = [m.model for m in recipe.models or []]
    if method.base == "unused" and recipe.base_model and recipe.models is not None:
        needs = [
            s.name
            for s in method.params.values()
            if s.per_model and s.required and s.name not in (recipe.parameters or {})
        ]
        if recipe.base_model not in listed and needs:
            problems.append(
                (
                    "base_model",
                    f"{method.name} takes no base, so base_model joins the inputs (as in "
                    f"mergekit) and needs {needs[0]!r}: list it under models with its "
                    "parameters, or remove base_model",
                )
            )
    found, ignored = check_parameters(method, recipe)
    warnings += ignored
    return problems + found + check_together(method, recipe)


def check_modules(recipe: Recipe, warnings: Found) -> Found:
    """Each module's name, inputs and parameters. A top-level parameter's problem is
    reported where it is written, once, whichever modules inherit it."""
    from weightops.engine.modules import canonical_module, unknown_module_message
    from weightops.merge.registry import unknown_method_message

    problems: Found = []
    noted: Found = []
    methods = all_methods()
    seen: dict[str, str] = {}
    used: set[str] = set()
    for name, module in (recipe.modules or {}).items():
        where = f"modules.{name}"
        canonical = canonical_module(name)
        if canonical is None:
            problems.append((where, unknown_module_message(name)))
        elif canonical in seen:
            problems.append((where, f"is the same module as modules.{seen[canonical]}"))
        else:
            seen[canonical] = name
        if (module.models is None) == (module.slices is None):
            problems.append((where, "give exactly one of 'models' or 'slices'"))
        method = methods.get(module.merge_method or recipe.merge_method)
        if method is None:
            problems.append(
                (f"{where}.merge_method", unknown_method_message(str(module.merge_method)))
            )
            continue
        used.add(method.name)
        own = module.parameters or {}
        found: Found = []
        errors = check_group(method, recipe.module_view(name), found)
        for into, pairs in ((problems, errors), (noted, found)):
            for path, msg in pairs:
                inherited = path.startswith("parameters.") and path.split(".")[1] not in own
                into.append((path if inherited else f"{where}.{path}".rstrip("."), msg))
    if recipe.merge_method not in used:
        for key in recipe.parameters or {}:
            if not any(key in methods[m].params for m in used):
                noted.append(
                    (f"parameters.{key}", f"has no effect: no module's merge method takes {key!r}")
                )
    warnings += list(dict.fromkeys(noted))
    return list(dict.fromkeys(problems))


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


def check_table_depth(recipe: Recipe, recipe_dir: Path) -> Found:
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
