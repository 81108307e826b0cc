"""Planning one merge of a recipe (the whole model, or one module) from headers.

`_Planner` opens every input (with its LoRA adapter, if any) and collects problems;
`plan_models` and `plan_slices` turn one `_Group` (a recipe or a module's view of it)
into tasks: a same-named tensor from every input, or stacked layer ranges.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightops.arch import (
    describe,
    rename_layer,
    text_config,
)
from weightops.engine.modules import before_blocks, module_depth, module_names, module_of
from weightops.engine.tasks import DTYPES, InputRef, TensorTask
from weightops.errors import MergeError
from weightops.io.checkpoint import Checkpoint
from weightops.io.lora import LoraAdapter, open_adapter, split_reference
from weightops.io.safetensors_file import TensorInfo
from weightops.merge.registry import MethodSpec
from weightops.recipe import Recipe, Setting, evaluate
from weightops.recipe_refs import resolve_model
from weightops.vocab.plan import is_vocab_tensor


def _seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class Source:
    """One input of a group: the model, its recipe parameters and its layer offset."""

    model: int
    params: dict[str, Setting] = field(default_factory=dict)
    first_layer: int = 0


@dataclass
class Group:
    """One merge of a plan: the whole recipe, or one module of it (its view)."""

    recipe: Recipe
    method: MethodSpec
    key: str = ""  # the `modules:` key
    module: str | None = None  # the module whose tensors it merges; None: every tensor

    @property
    def at(self) -> str:
        return f"modules.{self.key}." if self.key else ""

    def owns(self, name: str) -> bool:
        return self.module is None or module_of(name) == self.module


@dataclass
class Planned:
    lead: int  # the model whose non-merged parts (config) the group's output follows
    depths: dict[str, int] = field(default_factory=dict)  # new depth of sliced modules
    layer_types: list[Any] | None = None


class Planner:
    def __init__(
        self,
        recipe: Recipe,
        recipe_dir: Path | None,
        random_seed: int | None = None,
        numerics: str = "default",
    ) -> None:
        self.recipe = recipe
        self.random_seed = random_seed
        self.problems: list[str] = []
        self.paths: list[Path] = []
        self.ckpts: list[Checkpoint] = []
        self.adapters: dict[int, LoraAdapter] = {}
        self._index: dict[str, int] = {}
        for ref in recipe.model_paths():
            self._open(ref, recipe_dir)
        self.numerics = numerics
        if numerics == "mergekit":
            # mergekit computes in the recipe's dtype, or in the stored one without it.
            self.compute_dtype = DTYPES.get(recipe.dtype or "")
        else:
            self.compute_dtype = torch.float64 if recipe.dtype == "float64" else torch.float32
        self.out_dtype = DTYPES.get(recipe.out_dtype or recipe.dtype or "")
        self.tasks: list[TensorTask] = []
        self.sources: dict[tuple[int, str], TensorInfo] = {}

    def _open(self, ref: str, recipe_dir: Path | None) -> None:
        try:
            model, adapter = split_reference(ref)
        except ValueError as e:
            raise MergeError(str(e)) from e
        path = resolve_model(model, recipe_dir)
        if path is None:
            raise MergeError(f"model {model!r} not found (no such folder or file)")
        self._index[ref] = len(self.paths)
        self.paths.append(path)
        self.ckpts.append(Checkpoint(path))
        if adapter is not None:
            folder = resolve_model(adapter, recipe_dir)
            if folder is None:
                raise MergeError(f"LoRA adapter {adapter!r} not found (no such folder)")
            found, problems = open_adapter(folder, self.ckpts[-1])
            self.adapters[len(self.paths) - 1] = found
            self.problems += problems

    def idx(self, ref: str) -> int:
        return self._index[ref]

    def problem(self, msg: str) -> None:
        self.problems.append(msg)

    def value(self, key: str, default: Any, setting: Setting | None, name: str, t: float) -> Any:
        """A parameter's value at one tensor: its setting's, or the default where no
        condition matches; an empty list is a problem (it gives no value anywhere)."""
        if isinstance(setting, list) and not setting:
            self.problem(f"{name}: {key!r} is an empty list")
            return default
        value = None if setting is None else evaluate(setting, name, t)
        return default if value is None else value

    def resolve(
        self,
        method: MethodSpec,
        name: str,
        t: float,
        sources: list[Source],
        shared: dict[str, Setting],
    ) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for spec in method.params.values():
            if spec.per_model:
                values = []
                for src in sources:
                    setting = src.params.get(spec.name, shared.get(spec.name))
                    values.append(self.value(spec.name, spec.default, setting, name, t))
                if spec.required and any(v is None for v in values):
                    self.problem(f"{name}: no value of {spec.name!r} applies (check the filters)")
                params[spec.name] = [spec.validate(v)[0] if v is not None else None for v in values]
            else:
                value = self.value(spec.name, spec.default, shared.get(spec.name), name, t)
                if value is None and spec.required:
                    self.problem(f"{name}: no value of {spec.name!r} applies (check the filters)")
                params[spec.name] = spec.validate(value)[0] if value is not None else None
        if method.name == "linear" and params.get("normalize") and sum(params["weight"]) == 0:
            self.problem(f"{name}: the linear weights sum to 0 here, so they cannot be normalized")
        if method.check is not None and (msg := method.check(params)):
            self.problem(f"{name}: {msg}")
        return params

    def add(
        self,
        g: Group,
        out_name: str,
        t: float,
        base: Source | None,
        sources: list[Source],
        shared: dict[str, Setting],
        in_layer: int | None,
    ) -> None:
        """Plan one output tensor from the same-named tensor of each source."""
        refs: list[InputRef] = []
        shape = None
        stored_dtype = None
        for src in [*([base] if base else []), *sources]:
            ckpt = self.ckpts[src.model]
            name = (
                out_name if in_layer is None else rename_layer(out_name, src.first_layer + in_layer)
            )
            info = ckpt.info(name)
            if info is None:
                self.problem(f"tensor {name!r} is missing in {self.paths[src.model]}")
                return
            stored = info.name
            adapter = self.adapters.get(src.model)
            if adapter is not None and stored in adapter.replaced:
                info = adapter.replaced[stored]
            if shape is None:
                shape, stored_dtype = info.shape, info.dtype
            elif info.shape != shape and not (
                # Vocabularies of different sizes are reconciled by weightops.vocab.
                is_vocab_tensor(name, shape) and info.shape[1:] == shape[1:]
            ):
                self.problem(
                    f"tensor {name!r} has shape {list(info.shape)} in {self.paths[src.model]} "
                    f"but {list(shape)} in {self.paths[(base or sources[0]).model]}"
                )
                return
            refs.append(InputRef(src.model, stored))
            self.sources[(src.model, stored)] = info
        assert shape is not None and stored_dtype is not None
        base_ref = refs[0] if base else None
        inputs = tuple(refs[1:] if base else refs)
        is_float = stored_dtype.is_floating_point
        out_dtype = stored_dtype
        if is_float:
            out_dtype = self.out_dtype or stored_dtype
            if not self.recipe.out_dtype:
                out_dtype = g.method.result_dtype(self.numerics, out_dtype)
        params = self.resolve(g.method, out_name, t, sources, shared) if is_float else {}
        seed = params.get("seed")
        if self.random_seed is not None and g.method.wants_rng:
            seed = self.random_seed
            if "seed" in params:
                params["seed"] = seed
        self.tasks.append(
            TensorTask(
                name=out_name,
                shape=shape,
                out_dtype=out_dtype,
                inputs=inputs,
                base=base_ref,
                params=tuple(params.items()),
                method=g.method.name,
                module=g.key,
                copy=not is_float,
                seed=_seed(seed, out_name) if g.method.wants_rng and seed is not None else None,
            )
        )


def _sorted_names(ckpt: Checkpoint) -> list[str]:
    # File order keeps the output's layout close to the inputs' (embeddings first).
    return sorted(ckpt.tensors, key=lambda n: (ckpt.tensors[n].path.name, ckpt.tensors[n].start))


def _depth_fraction(layer: int | None, n: int) -> float:
    if layer is None:
        return 0.0
    return layer / (n - 1) if n > 1 else 1.0


def plan_models(p: Planner, g: Group) -> Planned:
    r = g.recipe
    uses_base = g.method.base != "unused"
    base = Source(p.idx(r.base_model)) if uses_base and r.base_model else None
    sources = [
        Source(p.idx(m.model), dict(m.parameters or {}))
        for m in r.models or []
        if not (uses_base and m.model == r.base_model)
    ]
    if not uses_base and r.base_model and r.base_model not in [m.model for m in r.models or []]:
        # mergekit adds a base_model that the models do not list as one more input,
        # with default parameters, for methods that take no base.
        sources.append(Source(p.idx(r.base_model)))
    lead = base or sources[0]
    ref = p.ckpts[lead.model]
    # Each module's layers span its own depth (a vision tower's gradient runs over the
    # tower's layers, not the text decoder's).
    names = [n for n in _sorted_names(ref) if g.owns(n)]
    depths = {m: module_depth(ref.config, m, ref.tensors) for m in module_names(names)}
    # A tied lm_head is absent from the reference's files, so the output stays tied too.
    for name in names:
        t = _depth_fraction(describe(name).layer, depths[module_of(name)])
        p.add(g, name, t, base, sources, dict(r.parameters or {}), None)
    # The reference decides the output's tensors, so one that only the other inputs
    # have would be dropped silently; a tied lm_head is the one allowed difference.
    known = set(names) | set(ref.aliases)
    reference = p.paths[lead.model]
    for src in sources:
        for name in sorted(set(p.ckpts[src.model].tensors) - known):
            if g.owns(name):
                p.problem(f"tensor {name!r} of {p.paths[src.model]} is missing in {reference}")
    return Planned(lead.model)


def plan_slices(p: Planner, g: Group) -> Planned:
    """Stack the slices' layer ranges; tensors outside decoder blocks (embeddings,
    final norm, lm_head) are merged from the first slice's sources (embeddings) or
    the last slice's (everything else), as mergekit does."""
    r = g.recipe
    uses_base = g.method.base != "unused"
    before, p.tasks = p.tasks, []
    groups = []
    out_layer = 0
    layer_types: list[Any] = []
    for i, s in enumerate(r.slices or []):
        at = f"{g.at}slices[{i}]"
        lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
        if len(lengths) != 1 or min(lengths) <= 0:
            p.problem(
                f"{at}: every source needs the same positive number of layers (got {sorted(lengths)})"
            )
            continue
        length = lengths.pop()
        base_ref = s.base_model or r.base_model
        shared = {**(r.parameters or {}), **(s.parameters or {})}
        base, sources = None, []
        outside = False
        for src in s.sources:
            entry = Source(p.idx(src.model), dict(src.parameters or {}), src.layer_range[0])
            if uses_base and src.model == base_ref:
                base = entry
            else:
                sources.append(entry)
            ckpt = p.ckpts[entry.model]
            depth = module_depth(ckpt.config, g.module or "text_decoder", ckpt.tensors)
            if src.layer_range[0] < 0 or src.layer_range[1] > depth:
                p.problem(
                    f"{at}: layer_range {list(src.layer_range)} is outside the {depth} layers of {src.model}"
                )
                outside = True
        if outside:
            continue  # never walk a range the model does not have (it may be huge)
        if uses_base and base is None and base_ref:
            base = Source(p.idx(base_ref), {}, s.sources[0].layer_range[0])
        if base is None and not sources:
            p.problem(f"{at}: no sources")
            continue
        lead = base or sources[0]
        groups.append((lead, base, sources, shared))
        ref = p.ckpts[lead.model]
        names = [n for n in _sorted_names(ref) if g.owns(n)]
        if g.module is None and len(found := module_names(ref.tensors)) > 1:
            p.problem(
                f"{at}: {p.paths[lead.model]} has several modules ({', '.join(found)}); "
                "slice a multimodal model per module, under `modules:`"
            )
            break
        kinds = text_config(ref.config).get("layer_types")
        for k in range(length):
            src_layer = lead.first_layer + k
            t = _depth_fraction(k, length)
            in_layer = [n for n in names if describe(n).layer == src_layer]
            for name in in_layer:
                p.add(g, rename_layer(name, out_layer + k), t, base, sources, shared, k)
            if isinstance(kinds, list) and src_layer < len(kinds):
                layer_types.append(kinds[src_layer])
        out_layer += length
    if not groups:
        p.tasks = before
        return Planned(0)
    layer_tasks, p.tasks = p.tasks, []
    _plan_outside_layers(p, g, groups[0], embeddings=True)
    pre, p.tasks = p.tasks, []
    _plan_outside_layers(p, g, groups[-1], embeddings=False)
    p.tasks = before + pre + layer_tasks + p.tasks
    module = g.module or "text_decoder"
    text = module == "text_decoder" and len(layer_types) == out_layer
    return Planned(groups[0][0].model, {module: out_layer}, layer_types if text else None)


def _plan_outside_layers(p: Planner, g: Group, group: tuple, *, embeddings: bool) -> None:
    lead, base, sources, shared = group
    for name in _sorted_names(p.ckpts[lead.model]):
        if g.owns(name) and describe(name).layer is None and before_blocks(name) == embeddings:
            p.add(g, name, 0.0, base, sources, shared, None)
