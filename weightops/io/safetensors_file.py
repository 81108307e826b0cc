"""Reading one safetensors file lazily and safely.

The header is parsed and checked against the file size before any tensor is touched,
so a truncated download or a header that lies about its sizes is a clear error rather
than a crash or a silent short read. Tensor bytes are read with `preadv` straight into
the destination tensor's memory: the data passes through the kernel's page cache but
never stays mapped in this process, so resident memory holds only the tensors in
flight, however large the model. (A memory map keeps every page it touched resident
until it is unmapped, which makes peak RSS grow with the model.)
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from weightops.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header is JSON of a few hundred bytes per tensor; anything this large is corrupt.
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return tensor infos and metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: file is {size} bytes, too short to be safetensors",
                    hint="the file is truncated or empty; download or save it again",
                )
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise CheckpointError(
                    f"{path}: header claims {hlen} bytes but the file has {size}",
                    hint="the file is truncated or not safetensors; download or save it again",
                )
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: header is not valid JSON ({e})",
            hint="the file is corrupted; download or save it again",
        ) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object", hint="the file is corrupted")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + hlen
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _tensor_info(path, name, entry, data_start, size)
    return infos, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    bad = CheckpointError(
        f"{path}: tensor {name!r} has a malformed header entry",
        hint="the file is corrupted; download or save it again",
    )
    if not isinstance(entry, dict):
        raise bad
    dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}"
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise bad
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    ):
        raise bad
    begin, end = offsets
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if begin < 0 or end < begin or end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} claims {end - begin} bytes but its shape {shape} "
            f"and dtype need {expected}",
            hint="the file is corrupted; download or save it again",
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes",
            hint="the file is truncated (interrupted download?); download or save it again",
        )
    return TensorInfo(path, name, dtype, tuple(shape), data_start + begin, data_start + end)


class FileReader:
    """Reads tensors from safetensors files, keeping one descriptor per file open."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Return a fresh CPU tensor with the stored dtype: the whole tensor, or rows
        [r0, r1) of its first dimension (contiguous bytes in the file)."""
        start, shape = info.start, info.shape
        if rows is not None:
            r0, r1 = rows
            row_bytes = info.nbytes // shape[0]
            start += r0 * row_bytes
            shape = (r1 - r0, *shape[1:])
        out = torch.empty(shape, dtype=info.dtype)
        nbytes = out.numel() * out.element_size()
        if nbytes == 0:
            return out
        with self._lock:
            fd = self._fds.get(info.path)
            if fd is None:
                fd = self._fds[info.path] = os.open(info.path, os.O_RDONLY)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < nbytes:
            try:
                n = os.preadv(fd, [buf[done:]], start + done)
            except OSError as e:
                raise CheckpointError(
                    f"{info.path}: reading {info.name!r} failed: {e.strerror}"
                ) from e
            if n == 0:
                raise CheckpointError(
                    f"{info.path}: file ended while reading {info.name!r}",
                    hint="the file was truncated after it was opened",
                )
            done += n
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
