"""Writing a sharded safetensors checkpoint, streaming and atomically.

The plan knows every output tensor's name, shape and dtype before any is computed, so
the shard layout and every header are fixed up front: headers are written first and
each tensor is written at its final offset the moment it is ready. Nothing is held
back to fill a shard, so memory stays at the tensors in flight. The free space is
checked against the known output size before any work, so a full disk fails at the
start, not after an hour; space that runs out later (another writer) is still a clean
error. (Reserving the space with fallocate was measured to slow the writes down
several-fold on ext4, so it is not done.)

Everything goes into a hidden temporary folder beside the target, renamed into place
only when complete; any failure or interrupt removes it, and one left by a killed run
is removed by the next run into the same destination.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightops import signals
from weightops.errors import CheckpointError, OutputError
from weightops.io.checkpoint import INDEX_NAME
from weightops.io.safe_read import Stamp, file_stamp
from weightops.io.safetensors_file import DTYPE_NAMES


@dataclass(frozen=True)
class Slot:
    """Where one output tensor goes."""

    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int


@dataclass
class Layout:
    """Shard assignment of the output tensors, in plan order."""

    files: list[str]
    headers: list[bytes]
    slots: dict[str, Slot]
    shard_sizes: list[int] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.shard_sizes)


def _header_bytes(entries: dict[str, dict], metadata: dict[str, str]) -> bytes:
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def plan_layout(
    tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
    max_shard_bytes: float,
    metadata: dict[str, str],
    single_file: str | None = None,
) -> Layout:
    """Assign tensors to shards of at most `max_shard_bytes` of data (a tensor larger
    than the limit gets a shard of its own), HF file names, headers and offsets.
    `single_file` puts everything in one file of that name (e.g. a LoRA adapter's
    adapter_model.safetensors, which peft reads unsharded)."""
    if single_file is not None:
        max_shard_bytes = math.inf
    groups: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
    used = 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, shape, dtype, nbytes))
        used += nbytes
    n = len(groups)
    files = (
        [single_file or "model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    headers, slots, sizes = [], {}, []
    for shard, group in enumerate(groups):
        entries, pos = {}, 0
        for name, shape, dtype, nbytes in group:
            entries[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [pos, pos + nbytes],
            }
            pos += nbytes
        header = _header_bytes(entries, metadata)
        start = 8 + len(header)
        for name, _, _, nbytes in group:
            slots[name] = Slot(shard, start + entries[name]["data_offsets"][0], nbytes)
        headers.append(header)
        sizes.append(start + pos)
    return Layout(files, headers, slots, sizes)


def _disk_error(path: Path, e: OSError) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"{path}: disk full while writing the output",
            hint="free some space or write elsewhere with -o; nothing was left behind",
        )
    return OutputError(f"{path}: cannot write: {e.strerror or e}")


class ShardWriter:
    """Open shard files with their headers written and their space reserved.

    With `create=False` the shards another writer created are opened as they are (a
    worker of a distributed executor writing its tensors into the driver's shards);
    a shard that is gone (the run was stopped and its staging folder removed) is an
    error, never created afresh."""

    def __init__(
        self, folder: Path, layout: Layout, display: Path | None = None, *, create: bool = True
    ) -> None:
        self.folder = folder
        self.display = display or folder  # the path users know: the final output folder
        self.layout = layout
        self._fds: list[int] = []
        try:
            for name, header in zip(layout.files, layout.headers, strict=True):
                if not create:
                    self._fds.append(os.open(folder / name, os.O_WRONLY))
                    continue
                fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                _pwrite_all(fd, len(header).to_bytes(8, "little") + header, 0)
        except OSError as e:
            self.close()
            raise _disk_error(self.display, e) from e

    def presize(self) -> None:
        """Give every shard its final size (sparse: no blocks are allocated), so that
        writers on other machines of a shared filesystem find a file of the planned
        length whatever order their tensors land in."""
        try:
            for fd, size in zip(self._fds, self.layout.shard_sizes, strict=True):
                os.ftruncate(fd, size)
        except OSError as e:
            raise _disk_error(self.display, e) from e

    def write(self, name: str, tensor: torch.Tensor, at: int = 0) -> None:
        """Write `tensor` (the whole output tensor, or a row block starting `at` bytes
        into it) at its place in the shard."""
        slot = self.layout.slots[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if at + data.numel() > slot.nbytes:
            raise OutputError(f"{name}: computed {at + data.numel()} bytes, planned {slot.nbytes}")
        try:
            _pwrite_all(self._fds[slot.shard], memoryview(data.numpy()), slot.offset + at)
        except OSError as e:
            raise _disk_error(self.display, e) from e

    def finish(self) -> None:
        """Flush everything to disk so the folder is complete once it is renamed."""
        try:
            for fd in self._fds:
                os.fsync(fd)
        except OSError as e:
            raise _disk_error(self.display, e) from e
        finally:
            self.close()

    def write_index(self, total_data_bytes: int) -> None:
        write_index(self.folder, self.layout, total_data_bytes)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def write_index(folder: Path, layout: Layout, total_data_bytes: int) -> None:
    """The shard index (model.safetensors.index.json) of a sharded output."""
    if len(layout.files) == 1:
        return
    weight_map = {name: layout.files[s.shard] for name, s in layout.slots.items()}
    index = {"metadata": {"total_size": total_data_bytes}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class StagingFolder:
    """A temporary folder beside `target` that becomes `target` on commit, or vanishes
    (with any parent folders it had to create) on discard.

    For the whole run the destination is locked (an flock on a hidden lock file beside
    it), so a second run into the same folder fails at once instead of racing this one;
    staging folders left beside it by a killed run are removed once the lock is held.
    The target may not be, contain or lie inside any of `inputs`: a run never writes
    into or replaces a model it reads."""

    def __init__(self, target: Path, *, force: bool, inputs: Sequence[Path] = ()) -> None:
        self.target = _absolute(target)
        self.force = force
        _refuse_overlap(self.target, inputs)
        self._check_target()
        prefix = f".{self.target.name}.weightops-"
        self.path = self.target.parent / f"{prefix}tmp-{os.getpid()}"
        self._lock_path = self.target.parent / f"{prefix}lock"
        self._lock_fd: int | None = None
        self._made: list[Path] = []

    def _check_target(self) -> None:
        target = self.target
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise OutputError(f"{target}: exists and is not a folder", hint="choose another -o")
        try:
            nonempty = target.is_dir() and any(target.iterdir())
        except OSError as e:
            raise OutputError(f"{target}: cannot read the output folder: {e.strerror}") from e
        if nonempty and not self.force:
            raise OutputError(
                f"{target}: output folder exists and is not empty",
                hint="pass --force to replace it, or choose another -o",
            )

    def create(self) -> None:
        try:
            missing = []
            parent = self.target.parent
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            for folder in reversed(missing):
                folder.mkdir()
                self._made.append(folder)
            self._lock()
            self._check_target()
            self._remove_stale()
            self.path.mkdir()
        except OSError as e:
            self.discard()
            raise OutputError(f"{self.target}: cannot create the output: {e.strerror or e}") from e
        except BaseException:
            self.discard()
            raise

    def _lock(self) -> None:
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(
                    f"{self.target}: another weightops run is writing this output folder",
                    hint="wait for it to finish, or choose another -o",
                ) from None
            # The holder before us may have removed the lock file after we opened it:
            # then our lock is on a file nobody else sees, so take the new one.
            try:
                same = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _remove_stale(self) -> None:
        """Staging and replaced folders of this destination left by a killed run."""
        stale = re.compile(re.escape(f".{self.target.name}.weightops-") + r"(tmp|old)-\d+")
        for leftover in self.target.parent.glob(f".{glob.escape(self.target.name)}.weightops-*"):
            if stale.fullmatch(leftover.name) and leftover.is_dir() and leftover != self.path:
                shutil.rmtree(leftover, ignore_errors=True)
                if not leftover.exists():
                    print(f"note: removed {leftover}, left by an interrupted run", file=sys.stderr)

    def check_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.path).free
        if needed > free:
            raise OutputError(
                f"{self.target}: the output needs {needed / 1e9:.2f} GB but only "
                f"{free / 1e9:.2f} GB are free",
                hint="free some space or write elsewhere with -o",
            )

    def commit(self) -> None:
        signals.raise_if_stopped()
        old = None
        try:
            if self.target.exists():
                old = self.target.parent / f".{self.target.name}.weightops-old-{os.getpid()}"
                os.rename(self.target, old)
            os.rename(self.path, self.target)
        except OSError as e:
            raise OutputError(f"{self.target}: cannot put the output in place: {e.strerror}") from e
        self._made = []
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._unlock()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._unlock()
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)
            os.close(self._lock_fd)
            self._lock_fd = None


def _absolute(target: Path) -> Path:
    path = Path(os.path.normpath(Path(target).absolute()))
    if path == path.parent:
        raise OutputError(f"{target}: cannot write the output over the root folder")
    here = Path.cwd().resolve()
    real = path.resolve()
    if real == here or real in here.parents:
        raise OutputError(
            f"{target}: the output would replace the folder you are in",
            hint="choose a new folder for -o",
        )
    return path


def _refuse_overlap(target: Path, inputs: Sequence[Path]) -> None:
    real = target.resolve()
    for given in inputs:
        src = Path(given).resolve()
        inside = src.is_dir() and src in real.parents
        if real == src or inside or real in src.parents:
            raise OutputError(
                f"{target}: the output folder is, contains or lies inside the input {given}",
                hint="write the output to a folder of its own with -o",
            )


def check_unchanged(stamps: dict[Path, Stamp | None]) -> None:
    """Fail if any input file was replaced, rewritten, resized or deleted since it was
    opened: the output would mix old and new data."""
    changed = [path for path, stamp in stamps.items() if file_stamp(path) != stamp]
    if changed:
        raise CheckpointError(
            f"{changed[0]}: the input changed while it was read"
            + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""),
            hint="the output was discarded; run again once the inputs are stable",
        )


def disk_error(path: Path, e: OSError) -> OutputError:
    """An OSError met while writing the output, as the one-line error users see."""
    return _disk_error(path, e)
