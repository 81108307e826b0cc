"""Writing a modified copy of a checkpoint, one tensor at a time.

Used by jobs that change a few tensors of one model (baking a steering vector,
repair): every tensor is read, passed through `transform`, and written by the same
atomic sharded writer as a merge, together with the source's config (with any
updates), generation config and tokenizer, and a model card.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightops import __version__
from weightops.io import sidefiles
from weightops.io.background import BackgroundWrites
from weightops.io.checkpoint import Checkpoint
from weightops.io.safetensors_file import FileReader
from weightops.io.writer import (
    Layout,
    ShardWriter,
    StagingFolder,
    check_unchanged,
    disk_error,
    plan_layout,
    write_index,
)

Transform = Callable[[str, torch.Tensor | None], torch.Tensor]
Entry = tuple[str, tuple[int, ...], torch.dtype]


@dataclass
class Staged:
    """An output being written: its staging folder and shard layout, and the copy of
    the source's side files, which runs beside the tensors' work."""

    path: Path
    layout: Layout
    side_files: Future[None]

    def check(self) -> None:
        """Raise the side files' error once their copy has failed (cheap otherwise): a
        long job calls this as it goes, so a bad tokenizer.json stops it early."""
        if self.side_files.done():
            self.side_files.result()


def rewrite_checkpoint(
    source: Checkpoint,
    out: Path,
    transform: Transform,
    *,
    new_tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    config_updates: dict[str, Any] | None = None,
    title: str,
    summary: list[str],
    settings: dict[str, Any],
    tag: str,
    dtype: torch.dtype | None = None,
    force: bool = False,
    shard_size: int = 5 * 10**9,
) -> Path:
    """Write `source` with every tensor replaced by transform(name, tensor) to `out`.

    `new_tensors` adds tensors that the source lacks (transform gets None for them);
    tensors keep their names, shapes and dtypes, except that `dtype` (if given) replaces
    the dtype of every floating-point tensor, and config.json says so."""
    new_tensors = new_tensors or {}
    entries = [(n, source.tensors[n].shape, source.tensors[n].dtype) for n in ordered_names(source)]
    entries += [(n, shape, dt) for n, (shape, dt) in new_tensors.items()]
    if dtype is not None:
        entries = [(n, shape, dtype if dt.is_floating_point else dt) for n, shape, dt in entries]
        key = "dtype" if "dtype" in source.config else "torch_dtype"
        config_updates = {**(config_updates or {}), key: str(dtype).removeprefix("torch.")}

    def produce(name: str, reader: FileReader) -> torch.Tensor:
        tensor = reader.read(source.tensors[name]) if name in source.tensors else None
        return transform(name, tensor)

    return write_model(
        source,
        out,
        entries,
        produce,
        config_updates=config_updates,
        title=title,
        summary=summary,
        settings=settings,
        tag=tag,
        force=force,
        shard_size=shard_size,
    )


def ordered_names(source: Checkpoint) -> list[str]:
    """Tensor names in file order (embeddings first, as the source stores them)."""
    return sorted(
        source.tensors, key=lambda n: (source.tensors[n].path.name, source.tensors[n].start)
    )


def write_model(
    source: Checkpoint,
    out: Path,
    entries: list[Entry],
    produce: Callable[[str, FileReader], torch.Tensor],
    **staging: Any,
) -> Path:
    """Write a checkpoint folder whose tensors are `entries` (name, shape, dtype), in
    that order, each made by produce(name, reader) when its turn comes; the rest as
    `staged_model` (keyword arguments) says."""
    with staged_model(source, out, entries, **staging) as staged:
        writer = ShardWriter(staged.path, staged.layout, display=out)
        try:
            # Finished tensors wait for the disk while the next are made: at most
            # PENDING_BYTES of them (weightops.io.background) beyond the oldest. The
            # count is loose because a quantized matrix is six small tensors: with two
            # at most, quantizing SmolLM2-135M waited 0.4–0.6 s on its 1322 writes.
            with FileReader() as reader, BackgroundWrites(writer, depth=64) as writes:
                for name, shape, dtype in entries:
                    staged.check()
                    result = produce(name, reader)
                    if tuple(result.shape) != tuple(shape):
                        raise ValueError(
                            f"{name}: produced shape {list(result.shape)}, planned {list(shape)}"
                        )
                    writes.write(name, result.to(dtype))
                writes.drain()
            writer.finish()
        finally:
            writer.close()
    return out


@contextlib.contextmanager
def staged_model(
    source: Checkpoint,
    out: Path,
    entries: list[Entry],
    *,
    config_updates: dict[str, Any] | None = None,
    title: str,
    summary: list[str],
    settings: dict[str, Any],
    tag: str,
    force: bool = False,
    shard_size: int = 5 * 10**9,
    extra_files: dict[str, Callable[[], str]] | None = None,
    single_file: str | None = None,
) -> Iterator[Staged]:
    """The staging folder and shard layout of an output whose tensors are `entries`, for
    the caller to fill; the side files come from `source`, copied and checked on a
    thread of their own meanwhile (strict parsing of a tokenizer.json took a sixth of
    quantizing SmolLM2-135M); `tag` names the job in the model card. On a clean exit the
    index, `extra_files` and card are written and the folder is renamed to `out`. Atomic
    like a merge: nothing is left behind on failure."""
    metadata = {
        "format": "pt",
        "weightops_version": __version__,
        "weightops_settings": json.dumps(settings),
    }
    staging = StagingFolder(out, force=force, inputs=[source.path])
    try:
        staging.create()
        layout = plan_layout(entries, shard_size, metadata, single_file)
        staging.check_space(layout.total_bytes)
        config = {**source.config, **(config_updates or {})}
        # Leaving the block waits for the copy, also on a failure: the folder is never
        # removed from under it.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightops-side") as side:
            copy = side.submit(_copy_side_files, source, staging.path, config)
            yield Staged(staging.path, layout, copy)
            copy.result()
        write_index(
            staging.path, layout, sum(layout.shard_sizes) - sum(8 + len(h) for h in layout.headers)
        )
        # Called after every tensor is written, so they can report on the work.
        for fname, text in (extra_files or {}).items():
            (staging.path / fname).write_text(text())
        recipe = json.dumps(settings, indent=2)
        sidefiles.write_card(
            staging.path,
            title=title,
            summary=summary,
            recipe_yaml=recipe,
            version=__version__,
            heading="Settings",
            tag=tag,
        )
        check_unchanged(source.stamps)
        staging.commit()
    except OSError as e:
        staging.discard()
        raise disk_error(out, e) from e
    except BaseException:
        staging.discard()
        raise


def _copy_side_files(source: Checkpoint, folder: Path, config: dict[str, Any]) -> None:
    sidefiles.write_config(folder, config)
    sidefiles.copy_generation_config(source.folder, folder)
    sidefiles.copy_tokenizer(source.folder, folder)
