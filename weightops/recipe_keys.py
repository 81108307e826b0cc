"""The keys of a recipe that mergekit accepts and ignores, found before validation.

mergekit's configuration models drop keys they do not know (a misspelt `dype`, a
`nomalize` inside a condition, `revision:` beside a model's path), so a mergekit
config with such a key runs there. weightops runs it too, and says what was ignored:
`ignored_keys` removes each such key from the raw YAML mapping and records one
warning with its YAML path and the closest valid name. Blocks that only weightops
reads (`align:`) and the blocks other modules own (`tokenizer:`, `modules:`) are
left to their own strict checking.

Model references may also be written as mappings, as mergekit allows:
`{model: PATH}`, `{model: {path: PATH, revision: REV}}`, `{model: PATH, lora: LORA}`.
They become the string form (`PATH`, `PATH+LORA`); a revision has no effect, since
weightops reads local folders only.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from weightops.merge.registry import all_methods
from weightops.recipe import Condition, ModelInput, Recipe, Slice, SliceSource
from weightops.recipe_checks import Found, closest

_NO_EFFECT = "has no effect (unknown key)"


def ignored_keys(data: dict[str, Any], warnings: Found) -> dict[str, Any]:
    """A copy of a recipe mapping without the keys mergekit would ignore; one warning
    for each of them is appended to `warnings`."""
    data = copy.deepcopy(data)
    parameters = {name for m in all_methods().values() for name in m.params}
    for key in [k for k in data if k not in Recipe.model_fields]:
        if key == "name":
            msg = "has no effect in a single-document recipe (it names a step of a multi-document one)"
        elif key in parameters:
            msg = f"{_NO_EFFECT}; did you mean 'parameters.{key}'?"
        else:
            msg = _NO_EFFECT + closest(str(key), Recipe.model_fields)
        warnings.append((str(key), msg))
        del data[key]
    _model_ref(data, "base_model", "base_model", warnings)
    _conditions(data.get("parameters"), "parameters", warnings)
    for i, entry in _entries(data, "models"):
        _drop_unknown(entry, ModelInput, f"models[{i}]", warnings)
        _model_ref(entry, "model", f"models[{i}].model", warnings)
        _conditions(entry.get("parameters"), f"models[{i}].parameters", warnings)
    for i, piece in _entries(data, "slices"):
        _drop_unknown(piece, Slice, f"slices[{i}]", warnings)
        _model_ref(piece, "base_model", f"slices[{i}].base_model", warnings)
        _conditions(piece.get("parameters"), f"slices[{i}].parameters", warnings)
        for j, src in _entries(piece, "sources"):
            where = f"slices[{i}].sources[{j}]"
            _drop_unknown(src, SliceSource, where, warnings)
            _model_ref(src, "model", f"{where}.model", warnings)
            _conditions(src.get("parameters"), f"{where}.parameters", warnings)
    return data


def _entries(node: dict[str, Any], key: str) -> list[tuple[int, dict[str, Any]]]:
    items = node.get(key)
    if not isinstance(items, list):
        return []
    return [(i, e) for i, e in enumerate(items) if isinstance(e, dict)]


def _drop_unknown(
    node: dict[str, Any], model: type[BaseModel], where: str, warnings: Found
) -> None:
    for key in [k for k in node if k not in model.model_fields]:
        if key == "residual_weight":
            # mergekit declares it on a slice but never reads it.
            msg = "has no effect: mergekit accepts residual_weight and does not use it"
        else:
            msg = _NO_EFFECT + closest(str(key), model.model_fields)
        warnings.append((f"{where}.{key}", msg))
        del node[key]


def _conditions(params: Any, where: str, warnings: Found) -> None:
    """Unknown keys of `{value, filter}` conditions; a dropped `filtr` would make the
    condition match every tensor, which the warning makes visible."""
    if not isinstance(params, dict):
        return
    for key, setting in params.items():
        conds = setting if isinstance(setting, list) else [setting]
        for k, cond in enumerate(conds):
            if isinstance(cond, dict) and "value" in cond:
                at = f"{where}.{key}" + (f"[{k}]" if isinstance(setting, list) else "")
                _drop_unknown(cond, Condition, at, warnings)


_REFERENCE_KEYS = ("model", "lora", "override_architecture")


def _model_ref(node: dict[str, Any], key: str, where: str, warnings: Found) -> None:
    """A model reference written as a mapping, turned into its string form."""
    ref = node.get(key)
    if not isinstance(ref, dict) or "model" not in ref:
        return
    for extra in [k for k in ref if k not in _REFERENCE_KEYS]:
        msg = "has no effect: mergekit ignores it here"
        if extra == "revision":
            msg += "; a revision goes under model.revision (and has no effect on local folders)"
        else:
            msg += closest(str(extra), _REFERENCE_KEYS)
        warnings.append((f"{where}.{extra}", msg))
    if ref.get("override_architecture") is not None:
        warnings.append(
            (
                f"{where}.override_architecture",
                "has no effect: weightops merges tensors by name, whatever the architecture",
            )
        )
    path = ref["model"]
    if isinstance(path, dict) and "path" in path:
        for extra in [k for k in path if k not in ("path", "revision")]:
            warnings.append(
                (f"{where}.model.{extra}", _NO_EFFECT + closest(str(extra), ("path", "revision")))
            )
        if path.get("revision") is not None:
            warnings.append(
                (
                    f"{where}.model.revision",
                    "has no effect: weightops reads local folders, which have no revisions",
                )
            )
        path = path["path"]
    lora = ref.get("lora")
    if isinstance(lora, dict):
        lora = lora.get("path")
    if isinstance(path, str):
        node[key] = f"{path}+{lora}" if isinstance(lora, str) else path
