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

import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from weightops.errors import CheckpointError
from weightops.io.safe_read import decode_utf8, open_regular, parse_json

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

# The `safetensors` library's own bound on the header; anything larger is corrupt.
_MAX_HEADER = 100_000_000
_U64 = 2**64


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


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {why}", hint="the file is corrupted; download or save it again"
    )


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return tensor infos and metadata.

    The checks are those of the `safetensors` library (header size and JSON, types of
    every field, offsets that tile the data buffer exactly from 0 to its end with no
    gap or overlap, sizes that match shape and dtype) plus what it lets through:
    duplicate names, names that are not valid Unicode, dimensions of 2^62 or more.
    """
    fd = open_regular(path, "safetensors file")
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
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
        raw = os.pread(fd, hlen, 8)
        if len(raw) < hlen:
            raise CheckpointError(f"{path}: file ended inside the header", hint="it is truncated")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    finally:
        os.close(fd)
    # Writers put the object first; some library versions refuse anything before it.
    if not raw.startswith(b"{"):
        raise _corrupt(path, "header is not a JSON object")
    text = decode_utf8(raw, str(path), "the header", base=8)
    header = parse_json(text, str(path), "the header", base=8)
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must be an object of strings")
    data_start = 8 + hlen
    infos = {name: _tensor_info(path, name, entry, data_start) for name, entry in header.items()}
    _check_coverage(path, infos, size - data_start, data_start)
    return infos, metadata


def _is_u64(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _U64


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"tensor {name!r} has a header entry that is not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise _corrupt(path, f"tensor {name!r} has no {key!r}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str):
        raise _corrupt(path, f"tensor {name!r} has a dtype that is not a string")
    dtype = DTYPES.get(code)
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has unsupported dtype {code[:40]!r}",
            hint=f"weightops reads {', '.join(DTYPES)}",
        )
    if not (isinstance(shape, list) and all(_is_u64(d) for d in shape)):
        raise _corrupt(path, f"tensor {name!r} has a shape that is not a list of sizes")
    # torch sizes are signed 64-bit; a real tensor is nowhere near this.
    if any(d >= 2**62 for d in shape) or len(shape) > 16:
        raise _corrupt(path, f"tensor {name!r} has an impossible shape {shape}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)):
        raise _corrupt(path, f"tensor {name!r} has data_offsets that are not two byte offsets")
    begin, end = offsets
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end < begin or end - begin != expected:
        raise _corrupt(
            path,
            f"tensor {name!r} claims {end - begin} bytes but its shape {shape} "
            f"and dtype need {expected}",
        )
    return TensorInfo(path, name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_coverage(path: Path, infos: dict[str, TensorInfo], data_size: int, base: int) -> None:
    """The tensors must tile the data buffer: sorted by offset, each starts where the
    last ended, and the last ends at the end of the file."""
    size = base + data_size
    for info in infos.values():
        if info.end > size:
            raise CheckpointError(
                f"{path}: tensor {info.name!r} ends at byte {info.end} but the file has "
                f"{size} bytes",
                hint="the file is truncated (interrupted download?); download it again",
            )
    pos = 0
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start - base != pos:
            what = "overlaps the previous tensor" if info.start - base < pos else "leaves a gap"
            raise _corrupt(path, f"tensor {info.name!r} at data offset {info.start - base} {what}")
        pos = info.end - base
    if pos != data_size:
        raise _corrupt(
            path, f"the tensors cover {pos} bytes of data but the file holds {data_size}"
        )


class FileReader:
    """Reads tensors from safetensors files, keeping one descriptor per file open."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def read(
        self,
        info: TensorInfo,
        rows: tuple[int, int] | None = None,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return a fresh CPU tensor with the stored dtype: the whole tensor, or rows
        [r0, r1) of its first dimension (contiguous bytes in the file). `into`: a uint8
        tensor of exactly those bytes to read into instead (memory already mapped, for
        a caller that reuses it), which the result is a view of."""
        start, shape = info.start, info.shape
        if rows is not None:
            r0, r1 = rows
            row_bytes = info.nbytes // shape[0]
            start += r0 * row_bytes
            shape = (r1 - r0, *shape[1:])
        if into is None:
            out = torch.empty(shape, dtype=info.dtype)
        else:
            out = into.view(info.dtype).view(shape)
        nbytes = out.numel() * out.element_size()
        if nbytes == 0:
            return out
        with self._lock:
            fd = self._fds.get(info.path)
            if fd is None:
                fd = self._fds[info.path] = open_regular(info.path, "safetensors file")
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
