"""The aligned model's values of the restoration pool, read from its checkpoint each
time they are used instead of held in memory.

Restoration reads the aligned values of the pool once per recovery step, one tensor
at a time, to find the candidates and to write the chosen weights back; a read is
one weight matrix of one block (a few MB), from the kernel's page cache after the
first step. Holding them instead would cost the pool's size in the stored dtype for
the whole run.

A tensor is read from the checkpoint only where the loaded aligned model's value is
the stored value cast to the loaded dtype, bit for bit, which is checked once, when
the mapping is made; any other tensor (one an architecture converts on load, or one
stored under another name) is kept in memory as loaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from weightops.io.checkpoint import Checkpoint
from weightops.io.safetensors_file import FileReader, TensorInfo


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class StoredValues(Mapping[str, torch.Tensor]):
    """`loaded` (name → the aligned model's tensor) as a mapping whose tensors are read
    from `ckpt` when looked up (a fresh tensor each time, in the loaded dtype and on
    the loaded device). Close it (or use it as a context manager) to let go of the
    files."""

    def __init__(self, ckpt: Checkpoint, loaded: Mapping[str, torch.Tensor]) -> None:
        self._reader = FileReader()
        self._stored: dict[str, tuple[TensorInfo, torch.dtype, torch.device]] = {}
        self._held: dict[str, torch.Tensor] = {}
        for name, value in loaded.items():
            info = ckpt.tensors.get(name)
            if info is not None and _same_bits(
                self._reader.read(info).to(value.dtype), value.detach().cpu()
            ):
                self._stored[name] = (info, value.dtype, value.device)
            else:
                # Its own copy, so that nothing keeps the checkpoint's mapped file alive.
                self._held[name] = value.detach().clone()

    @property
    def held(self) -> list[str]:
        """The tensors kept in memory (those the checkpoint does not give as loaded)."""
        return list(self._held)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._held:
            return self._held[name]
        info, dtype, device = self._stored[name]
        return self._reader.read(info).to(device, dtype)

    def __iter__(self) -> Iterator[str]:
        yield from self._stored
        yield from self._held

    def __len__(self) -> int:
        return len(self._stored) + len(self._held)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> StoredValues:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
