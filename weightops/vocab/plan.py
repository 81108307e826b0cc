"""The vocabulary part of a merge plan: the output tokenizer, the row map of every
vocabulary tensor (embedding, lm_head), and the output's vocab_size.

With `tokenizer_source` or a `tokenizer:` block the merged tokenizer is built and the
vocabulary tensors are re-indexed to it (weightops.vocab.rows). Without either, the
base's tokenizer files are copied and the tensors are merged row for row as stored;
if the inputs have different row counts, their first rows in common are merged (what
mergekit does then), and the output's vocab_size says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightops.arch import describe, embedding_name, text_config
from weightops.io.checkpoint import Checkpoint
from weightops.recipe import Recipe
from weightops.recipe_refs import resolve_model
from weightops.vocab.build import Vocabulary, build_vocabulary
from weightops.vocab.config import effective
from weightops.vocab.rows import Fetch, Reindex, build_reindex

VOCAB_ROLES = ("embed", "lm_head")
_ALIGN_PROBLEM = "align: weight matching needs every model to have the same vocabulary rows"


@dataclass
class VocabPlan:
    vocabulary: Vocabulary | None  # None: the tokenizer files are copied
    size: int  # the output's rows (vocab_size)
    reindex: dict[str, Reindex]  # output tensor name -> how its inputs' rows are made
    summary: list[str]

    def load(
        self, task: Any, rows: tuple[int, int] | None, fetch: Fetch, dtype: torch.dtype
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """A task's inputs and base (rows [r0, r1) or all), re-indexed; a model used
        twice gets its own copy, as methods overwrite their inputs."""
        matrices = self.reindex[task.name].gather(rows, fetch, dtype)
        used: set[int] = set()

        def get(ref: Any) -> torch.Tensor:
            tensor = matrices[ref.model]
            if ref.model in used:
                tensor = tensor.clone()
            used.add(ref.model)
            return tensor

        inputs = [get(r) for r in task.inputs]
        return inputs, (get(task.base) if task.base else None)

    def padding_rows(
        self,
        tasks: list[Any],
        fetch_for: Callable[[Any], Fetch],
        dtype: torch.dtype,
        block_elements: int,
    ) -> None:
        """Compute every re-indexed tensor's padding rows (a pass over its rows)."""
        for task in tasks:
            rx = self.reindex.get(task.name)
            if rx is not None:
                rx.compute_pads(fetch_for(task), dtype, block_elements)


def is_vocab_tensor(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and describe(name).role in VOCAB_ROLES


def _model_rows(ckpt: Checkpoint) -> int | None:
    name = embedding_name(ckpt.tensors)
    if name is not None:
        return ckpt.tensors[name].shape[0]
    size = text_config(ckpt.config).get("vocab_size")
    return size if isinstance(size, int) else None


def _group_base(recipe: Recipe, role: str) -> str | None:
    """The base model of the inputs a vocabulary tensor is merged from: embeddings come
    from the first slice, lm_head from the last (weightops.engine.plan)."""
    if recipe.slices:
        s = recipe.slices[0] if role == "embed" else recipe.slices[-1]
        return s.base_model or recipe.base_model
    return recipe.base_model


def plan_vocabulary(
    recipe: Recipe,
    recipe_dir: Path | None,
    paths: list[Path],
    ckpts: list[Checkpoint],
    tasks: list[Any],
    sources: dict[tuple[int, str], Any],
    index: Callable[[str], int],
) -> tuple[VocabPlan | None, list[Any], list[str]]:
    """(the vocabulary plan or None when nothing changes, the tasks with the vocabulary
    tensors' output shapes, problems)."""
    settings = effective(recipe)
    vocab_tasks = [
        i for i, t in enumerate(tasks) if not t.copy and is_vocab_tensor(t.name, t.shape)
    ]

    def inputs(task: Any) -> list[Any]:
        return [*([task.base] if task.base else []), *task.inputs]

    if settings is None:
        return _common_rows(tasks, vocab_tasks, sources, inputs, recipe.align is not None)
    problems: list[str] = []
    source_path = None
    if settings.source not in ("union", "base"):
        source_path = resolve_model(settings.source, recipe_dir)
        if source_path is None:
            return None, tasks, [f"tokenizer source {settings.source!r} not found (no such folder)"]
        source_path = source_path if source_path.is_dir() else source_path.parent
    found_rows = [_model_rows(c) for c in ckpts]
    if None in found_rows:
        bad = paths[found_rows.index(None)]
        return None, tasks, [f"{bad}: no embedding tensor or vocab_size to merge vocabularies by"]
    rows = [int(r) for r in found_rows if r is not None]
    reference = index(recipe.base_model) if recipe.base_model else 0
    tokens = dict(settings.tokens or {})
    vocab = build_vocabulary(settings.source, list(tokens), paths, rows, reference, source_path)
    real = len(vocab.tokens)
    multiple = settings.pad_to_multiple_of or 1
    size = -(-real // multiple) * multiple
    model_index = {ref: index(ref) for ref in recipe.model_paths()}
    reindex: dict[str, Reindex] = {}
    tasks = list(tasks)
    for i in vocab_tasks:
        task = tasks[i]
        refs = inputs(task)
        models = list(dict.fromkeys(r.model for r in refs))
        base_ref = _group_base(recipe, describe(task.name).role)
        base = model_index.get(base_ref) if base_ref else None
        tensor_rows = {r.model: sources[(r.model, r.name)].shape[0] for r in refs}
        rx, found = build_reindex(
            vocab.tokens,
            {m: vocab.model_vocabs[m] for m in models},
            tensor_rows,
            base if base in models else None,
            tokens,
            model_index,
            size,
            task.shape[1],
        )
        problems += [f"{task.name}: {p}" for p in found]
        if not (rx.identity and all(n == size for n in tensor_rows.values())):
            reindex[task.name] = rx
        tasks[i] = dataclasses.replace(task, shape=(size, task.shape[1]))
    if reindex and recipe.align is not None:
        problems.append(_ALIGN_PROBLEM)
    summary = _summary(vocab, size, reindex, paths)
    return VocabPlan(vocab, size, reindex, summary), tasks, problems


def _common_rows(
    tasks: list[Any], vocab_tasks: list[int], sources: dict, inputs: Callable, align: bool
) -> tuple[VocabPlan | None, list[Any], list[str]]:
    """Without tokenizer settings: inputs with different row counts are cut to their
    first rows in common."""
    tasks = list(tasks)
    reindex = {}
    sizes = []
    for i in vocab_tasks:
        task = tasks[i]
        counts = {r.model: sources[(r.model, r.name)].shape[0] for r in inputs(task)}
        n = min(counts.values())
        if len(set(counts.values())) == 1:
            continue
        every = torch.arange(n)
        reindex[task.name] = Reindex({m: every for m in counts}, {}, n, n, task.shape[1])
        tasks[i] = dataclasses.replace(task, shape=(n, task.shape[1]))
        sizes.append((task.name, sorted(set(counts.values())), n))
    if not reindex:
        return None, tasks, []
    summary = [
        f"vocab rows  {name}: inputs have {', '.join(map(str, counts))} rows; the first {n} "
        "of each are merged (no tokenizer settings; set tokenizer_source to match rows by token)"
        for name, counts, n in sizes
    ]
    problems = [_ALIGN_PROBLEM] if align else []
    return VocabPlan(None, min(n for _, _, n in sizes), reindex, summary), tasks, problems


def update_config(config: dict[str, Any], size: int) -> None:
    """Set the output config's vocab_size (in the language-model part when nested)."""
    cfg = text_config(config)
    (cfg if "vocab_size" in cfg or cfg is config else config)["vocab_size"] = size


def _summary(
    vocab: Vocabulary, size: int, reindex: dict[str, Reindex], paths: list[Path]
) -> list[str]:
    real = len(vocab.tokens)
    what = {"union": "union of the models' tokenizers", "base": "the base model's tokenizer"}
    lines = [
        f"tokenizer   {what.get(vocab.source, f'the tokenizer of {vocab.source}')}: "
        f"{real} tokens" + (f", {size} rows (padded)" if size > real else "")
    ]
    lines += [
        f"            {paths[m]} has no tokenizer; taken to share the base's vocabulary"
        for m in vocab.borrowed
    ]
    if not reindex:
        lines.append("embeddings  every input's rows already match it: merged as stored")
        return lines
    lines.append(f"embeddings  re-indexed to the merged vocabulary: {', '.join(reindex)}")
    rx = next(iter(reindex.values()))
    for m, own in rx.own.items():
        have = int((own >= 0).sum())
        lines.append(f"            {paths[m].name}: {have} of {real} tokens from its own rows")
    k = rx.kinds
    lines.append(
        "            defaults: "
        f"{k['only']} from the only model with the token, {k['base']} from the base, "
        f"{k['mean']} averaged, {k['zero']} zero (in no model), {k['set']} set under "
        f"tokenizer.tokens ({k['forced']} forced)"
    )
    if size > real:
        lines.append(f"            rows {real}-{size - 1}: padding, each input's mean row")
    return lines
