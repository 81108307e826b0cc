"""The plan: what each output tensor needs, decided from headers alone.

A plan is a list of independent, picklable `TensorTask`s (inputs, base, method and
resolved parameters for one output tensor) plus what the writer needs (output dtype,
config). Building it opens every checkpoint's headers (and LoRA adapters' headers),
resolves per-layer parameters, and reports every missing tensor, shape mismatch and
bad parameter value at once, before a single tensor is read.

A recipe with `modules:` is planned one module at a time (weightops.engine.modules),
each with its own inputs, method and parameters; the output's config comes from the
text decoder's lead model, with each sliced module's new depth written into it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightops.align.match import Alignment
from weightops.align.model import AlignTarget, plan_alignment
from weightops.arch import text_config
from weightops.chat_templates import resolve_chat_template
from weightops.engine.modules import canonical_module, module_names, set_module_depth
from weightops.engine.planner import Group, Planner, plan_models, plan_slices
from weightops.engine.tasks import DTYPES, InputRef, TensorTask
from weightops.errors import MergeError
from weightops.io.lora import LoraAdapter
from weightops.io.safe_read import Stamp
from weightops.io.safetensors_file import TensorInfo
from weightops.merge.registry import DEFAULT_NUMERICS, NUMERICS, MethodSpec
from weightops.recipe import Recipe
from weightops.vocab.plan import VocabPlan, plan_vocabulary, update_config

__all__ = ["DTYPES", "InputRef", "Plan", "TensorTask", "build_plan"]
_MAX_LISTED = 8


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
    # Vocabulary merging (weightops.vocab): the output tokenizer and how the inputs'
    # embedding and lm_head rows are re-indexed to it as they are read.
    vocab: VocabPlan | None = None
    # The text of the recipe's `chat_template` (a name or `auto` expanded).
    chat_template: str | None = None
    # Every method a task uses, by name (the recipe's, and any module's own).
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    # `MODEL+LORA` inputs: the adapter merged into that model's tensors as they are read.
    adapters: dict[int, LoraAdapter] = field(default_factory=dict)

    # Every input file as it was when planned; checked again before the output is kept.
    stamps: dict[Path, Stamp | None] = field(default_factory=dict)
    # "default" (fp32 compute) or "mergekit" (the recipe's dtype, mergekit's order of
    # operations; see weightops.merge.registry).
    numerics: str = "default"
    # Whether random methods may draw per row block: the CPU generator draws one number
    # per entry in order, so blocks can repeat a whole tensor's draws; a GPU's does not.
    draws_in_blocks: bool = True

    def method_of(self, task: TensorTask) -> MethodSpec:
        return self.methods[task.method]

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

    def blockable(self, task: TensorTask) -> bool:
        """Whether the task's method may run on row blocks: it is elementwise, it cuts
        task vectors at ranks the engine finds beforehand (weightops.engine.select), or
        its random draws can be positioned per block (see `drawing_inputs`)."""
        method = self.method_of(task)
        if method.elementwise:
            return True
        if task.copy:
            return False
        params = dict(task.params)
        return (
            method.cut_positions(params, task.numel, self.numerics) is not None
            or self.drawing_inputs(task) is not None
        )

    def drawing_inputs(self, task: TensorTask) -> list[bool] | None:
        """Which inputs of a random method draw one number per entry, when its row
        blocks can draw them from generators positioned per input; else None."""
        if task.copy or task.seed is None or not self.draws_in_blocks:
            return None
        method = self.method_of(task)
        return method.drawing_inputs(dict(task.params), task.shape, self.numerics)

    def peak_bytes(self, read_ahead: int, chunk_elements: int) -> int:
        """Estimated peak memory of the tensor data (the Python and torch runtime come on
        top): the largest piece's inputs in the compute dtype with room for the method's
        temporaries, its output, and up to `read_ahead` bytes of the next pieces. Pieces
        are whole tensors, or row blocks of `chunk_elements` (see `blockable`)."""
        if not self.tasks:
            return 0
        item = torch.empty((), dtype=self.compute_dtype).element_size()

        def entries(t: TensorTask) -> int:
            return min(t.numel, chunk_elements) if self.blockable(t) else t.numel

        compute = max((len(t.inputs) + 3) * entries(t) * item + t.out_bytes for t in self.tasks)
        return compute + read_ahead


def _groups(recipe: Recipe) -> list[Group]:
    if recipe.modules is None:
        return [Group(recipe, recipe.method)]
    groups = []
    for key in recipe.modules:
        view = recipe.module_view(key)
        groups.append(Group(view, view.method, key, canonical_module(key)))
    return groups


def _check_modules_listed(p: Planner, groups: list[Group], lead: int) -> None:
    """With `modules:`, every module of the output's lead model must be listed: one left
    out would be missing from the output."""
    listed = {g.module for g in groups}
    for module, names in module_names(p.ckpts[lead].tensors).items():
        if module not in listed:
            p.problem(
                f"{p.paths[lead]} has a {module} ({names[0]!r}, …) that `modules:` does not "
                f"list; add modules.{module} (e.g. merge_method: passthrough with one model "
                "to copy it)"
            )


def build_plan(
    recipe: Recipe,
    recipe_dir: Path | None = None,
    *,
    random_seed: int | None = None,
    numerics: str = DEFAULT_NUMERICS,
) -> Plan:
    """Open every input's headers and plan each output tensor; raise one MergeError
    listing every missing tensor, shape mismatch and unresolved parameter.

    `random_seed` (mergekit's --random-seed) seeds every random method in place of
    the recipe's `seed` parameter; each tensor's generator is still seeded from it and
    the tensor's name, so the output does not depend on the order of work. `numerics`
    is "default" (fp32 compute) or "mergekit" (mergekit's dtype and arithmetic)."""
    if numerics not in NUMERICS:
        raise MergeError(f"unknown numerics {numerics!r}", hint=f"use one of {', '.join(NUMERICS)}")
    groups = _groups(recipe)
    for g in groups:
        if not g.method.supports(numerics):
            raise MergeError(
                f"{g.method.name} has no {numerics} numerics yet",
                hint="run it without --numerics",
            )
    p = Planner(recipe, recipe_dir, random_seed, numerics)
    planned = [(plan_slices if g.recipe.slices is not None else plan_models)(p, g) for g in groups]
    lead = next(
        (
            d.lead
            for g, d in zip(groups, planned, strict=True)
            if g.module in (None, "text_decoder")
        ),
        planned[0].lead,
    )
    if recipe.modules is not None:
        _check_modules_listed(p, groups, lead)
    align = None
    if recipe.align is not None:
        align, problems = plan_alignment(recipe.align, recipe_dir, p.ckpts)
        p.problems += problems
    vocab, p.tasks, problems = plan_vocabulary(
        recipe, recipe_dir, p.paths, p.ckpts, p.tasks, p.sources, p.idx
    )
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
    config = copy.deepcopy(p.ckpts[lead].config)
    for d in planned:
        for module, depth in d.depths.items():
            set_module_depth(config, module, depth)
        if d.layer_types is not None:
            text_config(config)["layer_types"] = d.layer_types
    if recipe.out_dtype or recipe.dtype:
        # transformers 5 writes `dtype`, older versions `torch_dtype`: keep the source's key.
        config["dtype" if "dtype" in config else "torch_dtype"] = str(p.out_dtype).removeprefix(
            "torch."
        )
    if vocab is not None:
        update_config(config, vocab.size)
    return Plan(
        recipe=recipe,
        method=recipe.method,
        models=p.paths,
        tasks=p.tasks,
        compute_dtype=p.compute_dtype,
        config=config,
        config_source=p.ckpts[lead].folder,
        tokenizer_source=None if vocab and vocab.vocabulary else p.ckpts[lead].folder,
        sources=p.sources,
        align=align,
        methods={g.method.name: g.method for g in groups},
        adapters=p.adapters,
        chat_template=resolve_chat_template(recipe.chat_template, p.paths),
        numerics=numerics,
        vocab=vocab,
        stamps={f: stamp for c in p.ckpts for f, stamp in c.stamps.items()},
    )
