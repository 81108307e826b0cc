"""Computing in float32 on a checkpoint stored in bfloat16 or float16 without holding
the whole model in float32.

Widening bfloat16 or float16 to float32 is exact, so a model loaded in its stored dtype
whose parameters are widened before they are used computes bit for bit what the same
model loaded in float32 computes. Restoration uses this to keep the parameters its
gradient passes never reach (the blocks past the ones it edits, an untied output head)
in the stored dtype, widening them only while the task metric runs, and the input
embedding in the stored dtype throughout, widening only the rows it looks up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from weightops.arch import describe
from weightops.compat import causal_lm
from weightops.io.checkpoint import Checkpoint


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


_LIBC = _libc()

# Stored dtypes that widen exactly into a compute dtype.
_EXACT = {torch.float32: (torch.bfloat16, torch.float16)}


def stored_dtype(ckpt: Checkpoint, compute: torch.dtype) -> torch.dtype:
    """The dtype to load `ckpt` in to compute in `compute`: its stored dtype when every
    floating tensor has that one and it widens into `compute` exactly, else `compute`."""
    dtypes = {i.dtype for i in ckpt.tensors.values() if i.dtype.is_floating_point}
    if len(dtypes) == 1 and next(iter(dtypes)) in _EXACT.get(compute, ()):
        return next(iter(dtypes))
    return compute


def load_narrow(folder: Path, stored: torch.dtype, compute: torch.dtype, device: str) -> nn.Module:
    """The model of `folder` with its parameters in `stored` and its buffers as a load in
    `compute` has them; when the buffers would differ (a model that builds them in the
    load dtype), it is loaded in `compute` instead."""
    model = causal_lm(folder, stored).to(device).eval()
    if stored != compute and any(
        b.is_floating_point() and b.dtype != compute for b in model.buffers()
    ):
        del model
        model = causal_lm(folder, compute).to(device).eval()
    return model


def deep_parameters(model: nn.Module, layers: int) -> list[nn.Parameter]:
    """The parameters a pass that stops after block `layers` − 1 does not use: those of
    the blocks from `layers` on, and the output head unless it is the input embedding."""
    out = []
    for name, p in model.named_parameters():
        layer = describe(name).layer
        if layer is not None and layer >= layers:
            out.append(p)
    return out + output_head(model)


def output_head(model: nn.Module) -> list[nn.Parameter]:
    """The output head's weight, unless it is the input embedding's (tied)."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    weight = getattr(head, "weight", None)
    if isinstance(weight, nn.Parameter) and weight is not getattr(embed, "weight", None):
        return [weight]
    return []


def narrow_embedding(model: nn.Module, compute: torch.dtype) -> list[nn.Parameter]:
    """Let the input embedding keep its stored dtype and give what it looks up in
    `compute` (exact: the rows of the widened table). Returns its weight, to leave out
    of `widen_except`; nothing for an embedding that does more than look rows up
    (one that scales them in its own dtype), which is widened as before."""
    embed = model.get_input_embeddings()
    if type(embed) is not nn.Embedding:
        return []

    def widen(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(compute)

    embed.register_forward_hook(widen)
    return [embed.weight]


def cast(params: Iterable[nn.Parameter], dtype: torch.dtype) -> None:
    """Give floating parameters `dtype` in place (their autograd flags are kept)."""
    for p in params:
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def widen_except(
    model: nn.Module, compute: torch.dtype, narrow: Iterable[nn.Parameter], *, own: bool = True
) -> None:
    """Every floating parameter of `model` in `compute`, except those of `narrow`,
    which get memory of their own: a model loaded as stored may hold views of the
    checkpoint's mapped file, whose pages count as the process's memory while any
    view of the file lives. With `own=False` they stay as loaded, for a model used
    once and let go: the pages of a mapped file that nothing reads cost nothing,
    while a copy would read them all."""
    skip = {id(p) for p in narrow}
    for p in model.parameters():
        if id(p) not in skip:
            cast([p], compute)
        elif own and p.is_floating_point() and p.dtype != compute:
            p.data = p.data.clone()
    release_freed()


def release_freed() -> None:
    """Hand memory freed by Python and torch back to the system (glibc keeps freed
    blocks of a few MB, the size of one weight or gradient, for reuse, so the freed
    widened copies and gradients of one phase would add to the next one's peak)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextmanager
def widened(params: list[nn.Parameter], compute: torch.dtype) -> Iterator[None]:
    """`params` in `compute` for the duration, then back in their dtypes (exact, as
    their values came from those dtypes and nothing changes them meanwhile)."""
    before = [p.dtype for p in params]
    cast(params, compute)
    try:
        yield
    finally:
        for p, dtype in zip(params, before, strict=True):
            cast([p], dtype)
        release_freed()
