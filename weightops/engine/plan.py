"""The plan: what each output tensor needs, decided from headers alone.

A plan is a list of independent, picklable `TensorTask`s (inputs, base, method and
resolved parameters for one output tensor) plus what the writer needs (output dtype,
config). Building it opens every checkpoint's headers, resolves per-layer parameters,
and reports every missing tensor, shape mismatch and bad parameter value at once,
before a single tensor is read.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightops.align.match import Alignment
from weightops.align.model import AlignTarget, plan_alignment
from weightops.arch import describe, layer_count_key, num_layers, rename_layer, text_config
from weightops.errors import MergeError
from weightops.io.checkpoint import Checkpoint
from weightops.io.safe_read import Stamp
from weightops.io.safetensors_file import TensorInfo
from weightops.merge.registry import MethodSpec
from weightops.recipe import Recipe, Setting, evaluate, resolve_model

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}
_MAX_LISTED = 8


@dataclass(frozen=True)
class InputRef:
    model: int  # index into Plan.models
    name: str  # stored tensor name (after following a tied lm_head)


@dataclass(frozen=True)
class TensorTask:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: tuple[InputRef, ...]
    base: InputRef | None
    params: tuple[tuple[str, Any], ...]
    copy: bool = False  # non-float tensors are copied from the first input, not merged
    seed: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class Plan:
    recipe: Recipe
    method: MethodSpec
    models: list[Path]
    tasks: list[TensorTask]
    compute_dtype: torch.dtype
    config: dict[str, Any]
    config_source: Path
    tokenizer_source: Path | None
    # Where every input tensor lives, from the headers read while planning.
    sources: dict[tuple[int, str], TensorInfo] = field(default_factory=dict)
    # Recipe `align:`: the reference every input is permuted to match. The executor
    # computes each model's permutations (by index in `models`) before merging and
    # applies them to every input tensor as it is read.
    align: AlignTarget | None = None
    permutations: dict[int, Alignment] = field(default_factory=dict)
    # Every input file as it was when planned; checked again before the output is kept.
    stamps: dict[Path, Stamp | None] = field(default_factory=dict)

    @property
    def output_bytes(self) -> int:
        return sum(t.out_bytes for t in self.tasks)

    def permutes_rows(self, task: TensorTask) -> bool:
        """Whether an input's rows are reordered, so it cannot be read in row blocks."""
        refs = [*task.inputs, *([task.base] if task.base else [])]
        return any(
            r.model in self.permutations and self.permutations[r.model].permutes_rows(r.name)
            for r in refs
        )

    def task_input_bytes(self, task: TensorTask) -> int:
        refs = [*task.inputs, *([task.base] if task.base else [])]
        return sum(self.sources[(r.model, r.name)].nbytes for r in refs)

    def peak_bytes(self, read_ahead: int, chunk_elements: int) -> int:
        """Estimated peak memory of the tensor data (the Python and torch runtime come on
        top): the largest piece's inputs in the compute dtype with room for the method's
        temporaries, its output, and up to `read_ahead` bytes of the next pieces. Pieces
        are whole tensors, or row blocks of `chunk_elements` for elementwise methods."""
        if not self.tasks:
            return 0
        item = torch.empty((), dtype=self.compute_dtype).element_size()

        def entries(t: TensorTask) -> int:
            return min(t.numel, chunk_elements) if self.method.elementwise else t.numel

        compute = max((len(t.inputs) + 3) * entries(t) * item + t.out_bytes for t in self.tasks)
        return compute + read_ahead


def _seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class _Source:
    """One input of a group: the model, its recipe parameters and its layer offset."""

    model: int
    params: dict[str, Setting] = field(default_factory=dict)
    first_layer: int = 0


class _Planner:
    def __init__(self, recipe: Recipe, recipe_dir: Path | None) -> None:
        self.recipe = recipe
        self.method = recipe.method
        self.problems: list[str] = []
        self.paths: list[Path] = []
        self.ckpts: list[Checkpoint] = []
        self._index: dict[str, int] = {}
        for ref in recipe.model_paths():
            path = resolve_model(ref, recipe_dir)
            if path is None:
                raise MergeError(f"model {ref!r} not found (no such folder or file)")
            self._index[ref] = len(self.paths)
            self.paths.append(path)
            self.ckpts.append(Checkpoint(path))
        self.global_params = dict(recipe.parameters or {})
        self.compute_dtype = torch.float64 if recipe.dtype == "float64" else torch.float32
        self.out_dtype = DTYPES.get(recipe.out_dtype or recipe.dtype or "")
        self.tasks: list[TensorTask] = []
        self.sources: dict[tuple[int, str], TensorInfo] = {}

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
        self, name: str, t: float, sources: list[_Source], shared: dict[str, Setting]
    ) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for spec in self.method.params.values():
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
        if self.method.name == "linear" and params.get("normalize") and sum(params["weight"]) == 0:
            self.problem(f"{name}: the linear weights sum to 0 here, so they cannot be normalized")
        return params

    def add(
        self,
        out_name: str,
        t: float,
        base: _Source | None,
        sources: list[_Source],
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
            if shape is None:
                shape, stored_dtype = info.shape, info.dtype
            elif info.shape != shape:
                self.problem(
                    f"tensor {name!r} has shape {list(info.shape)} in {self.paths[src.model]} "
                    f"but {list(shape)} in {self.paths[(base or sources[0]).model]}"
                )
                return
            refs.append(InputRef(src.model, info.name))
            self.sources[(src.model, info.name)] = info
        assert shape is not None and stored_dtype is not None
        base_ref = refs[0] if base else None
        inputs = tuple(refs[1:] if base else refs)
        is_float = stored_dtype.is_floating_point
        params = self.resolve(out_name, t, sources, shared) if is_float else {}
        seed = params.get("seed")
        self.tasks.append(
            TensorTask(
                name=out_name,
                shape=shape,
                out_dtype=(self.out_dtype or stored_dtype) if is_float else stored_dtype,
                inputs=inputs,
                base=base_ref,
                params=tuple(params.items()),
                copy=not is_float,
                seed=_seed(seed, out_name) if self.method.wants_rng and seed is not None else None,
            )
        )


def _sorted_names(ckpt: Checkpoint) -> list[str]:
    # File order keeps the output's layout close to the inputs' (embeddings first).
    return sorted(ckpt.tensors, key=lambda n: (ckpt.tensors[n].path.name, ckpt.tensors[n].start))


def _depth_fraction(layer: int | None, n: int) -> float:
    if layer is None:
        return 0.0
    return layer / (n - 1) if n > 1 else 1.0


def _plan_models(p: _Planner) -> tuple[int, dict[str, Any]]:
    r = p.recipe
    uses_base = p.method.base != "unused"
    base = _Source(p.idx(r.base_model)) if uses_base and r.base_model else None
    sources = [
        _Source(p.idx(m.model), dict(m.parameters or {}))
        for m in r.models or []
        if not (uses_base and m.model == r.base_model)
    ]
    lead = base or sources[0]
    ref = p.ckpts[lead.model]
    depth = num_layers(ref.config, ref.tensors)
    # A tied lm_head is absent from the reference's files, so the output stays tied too.
    names = _sorted_names(ref)
    for name in names:
        t = _depth_fraction(describe(name).layer, depth)
        p.add(name, t, base, sources, p.global_params, None)
    # The reference decides the output's tensors, so one that only the other inputs
    # have would be dropped silently; a tied lm_head is the one allowed difference.
    known = set(names) | set(ref.aliases)
    reference = p.paths[lead.model]
    for src in sources:
        for name in sorted(set(p.ckpts[src.model].tensors) - known):
            p.problem(f"tensor {name!r} of {p.paths[src.model]} is missing in {reference}")
    return lead.model, dict(ref.config)


def _plan_slices(p: _Planner) -> tuple[int, dict[str, Any]]:
    """Stack the slices' layer ranges; tensors outside decoder blocks (embeddings,
    final norm, lm_head) are merged from the first slice's sources (embeddings) or
    the last slice's (everything else), as mergekit does."""
    r = p.recipe
    uses_base = p.method.base != "unused"
    groups = []
    out_layer = 0
    layer_types: list[Any] = []
    for i, s in enumerate(r.slices or []):
        lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
        if len(lengths) != 1 or min(lengths) <= 0:
            p.problem(
                f"slices[{i}]: every source needs the same positive number of layers (got {sorted(lengths)})"
            )
            continue
        length = lengths.pop()
        base_ref = s.base_model or r.base_model
        shared = {**p.global_params, **(s.parameters or {})}
        base, sources = None, []
        outside = False
        for src in s.sources:
            entry = _Source(p.idx(src.model), dict(src.parameters or {}), src.layer_range[0])
            if uses_base and src.model == base_ref:
                base = entry
            else:
                sources.append(entry)
            depth = num_layers(p.ckpts[entry.model].config, p.ckpts[entry.model].tensors)
            if src.layer_range[0] < 0 or src.layer_range[1] > depth:
                p.problem(
                    f"slices[{i}]: layer_range {list(src.layer_range)} is outside the {depth} layers of {src.model}"
                )
                outside = True
        if outside:
            continue  # never walk a range the model does not have (it may be huge)
        if uses_base and base is None and base_ref:
            base = _Source(p.idx(base_ref), {}, s.sources[0].layer_range[0])
        if base is None and not sources:
            p.problem(f"slices[{i}]: no sources")
            continue
        lead = base or sources[0]
        groups.append((lead, base, sources, shared))
        ref = p.ckpts[lead.model]
        names = _sorted_names(ref)
        kinds = text_config(ref.config).get("layer_types")
        for k in range(length):
            src_layer = lead.first_layer + k
            t = _depth_fraction(k, length)
            for name in names:
                if describe(name).layer == src_layer:
                    p.add(rename_layer(name, out_layer + k), t, base, sources, shared, k)
            if isinstance(kinds, list) and src_layer < len(kinds):
                layer_types.append(kinds[src_layer])
        out_layer += length
    if not groups:
        return 0, {}
    layer_tasks, p.tasks = p.tasks, []
    _plan_outside_layers(p, groups[0], embeddings=True)
    pre, p.tasks = p.tasks, []
    _plan_outside_layers(p, groups[-1], embeddings=False)
    p.tasks = pre + layer_tasks + p.tasks
    lead = groups[0][0]
    config = dict(p.ckpts[lead.model].config)
    cfg = text_config(config) if "text_config" in config else config
    key = layer_count_key(config)
    if key:
        cfg[key] = out_layer
    if layer_types and len(layer_types) == out_layer:
        cfg["layer_types"] = layer_types
    return lead.model, config


def _plan_outside_layers(p: _Planner, group: tuple, *, embeddings: bool) -> None:
    lead, base, sources, shared = group
    for name in _sorted_names(p.ckpts[lead.model]):
        role = describe(name)
        if role.layer is None and (role.role in ("embed", "pos_embed")) == embeddings:
            p.add(name, 0.0, base, sources, shared, None)


def build_plan(recipe: Recipe, recipe_dir: Path | None = None) -> Plan:
    """Open every input's headers and plan each output tensor; raise one MergeError
    listing every missing tensor, shape mismatch and unresolved parameter."""
    p = _Planner(recipe, recipe_dir)
    lead, config = _plan_slices(p) if recipe.slices is not None else _plan_models(p)
    align = None
    if recipe.align is not None:
        align, problems = plan_alignment(recipe.align, recipe_dir, p.ckpts)
        p.problems += problems
    if not p.tasks and not p.problems:
        p.problem("the recipe selects no tensor to write (no slices, or no layers in them)")
    if p.problems:
        shown = "; ".join(p.problems[:_MAX_LISTED])
        more = len(p.problems) - _MAX_LISTED
        raise MergeError(
            f"cannot plan the merge: {shown}" + (f"; and {more} more" if more > 0 else ""),
            hint="all inputs must share the architecture and tensor shapes of the base",
        )
    if recipe.out_dtype or recipe.dtype:
        # transformers 5 writes `dtype`, older versions `torch_dtype`: keep the source's key.
        config["dtype" if "dtype" in config else "torch_dtype"] = str(p.out_dtype).removeprefix(
            "torch."
        )
    tok_ref = recipe.tokenizer_source
    if tok_ref in (None, "base"):
        tok = p.paths[lead]
    else:
        found = resolve_model(tok_ref, recipe_dir)
        if found is None:
            raise MergeError(f"tokenizer_source {tok_ref!r} not found (no such folder)")
        tok = found
    return Plan(
        recipe=recipe,
        method=p.method,
        models=p.paths,
        tasks=p.tasks,
        compute_dtype=p.compute_dtype,
        config=config,
        config_source=p.ckpts[lead].folder,
        tokenizer_source=tok if tok.is_dir() else tok.parent,
        sources=p.sources,
        align=align,
        stamps={f: stamp for c in p.ckpts for f, stamp in c.stamps.items()},
    )
