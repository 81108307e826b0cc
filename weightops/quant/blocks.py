"""Row blocks of the quantizer, and the working tensors they reuse.

Each pass of the quantizer over a matrix (the clip search's bucket sums, a refinement
step's code sums, the final rounding) goes through it in blocks of rows of about
BLOCK_VALUES values per thread, so that the few block-sized working tensors of the pass
stay in a core's cache instead of streaming the whole matrix through memory once per
operation. What is computed per group (the grids, their errors) is then solved for the
whole matrix at once: a few dozen small operations per matrix instead of per block.
Results do not depend on the block size.

The working tensors are kept here, by name and per thread: allocated afresh for every
block, each would be a new run of pages that the kernel maps and zeroes, which costs
about as much as the arithmetic done in it. The pool holds each name's largest size so
far for the life of the process: a few blocks, plus the float32 copy and the one-byte
codes of the largest batch of matrices quantized together (weightops.quant.mixed,
weightops.quant.rows), and the stored bytes of the largest batch read (two buffers when
the next batch is read ahead, weightops.quant.job).
"""

from __future__ import annotations

import math
import threading

import torch

# Values per row block and thread: a quarter megabyte of float32 per working tensor, so
# a pass's four to six of them and the block's weights fit in a core's L2 cache.
BLOCK_VALUES = 1 << 16

_local = threading.local()


def row_blocks(t: torch.Tensor, values: int | None = None) -> list[slice]:
    """Slices of the first dimension of t, each of about BLOCK_VALUES values per thread
    (or `values`; one row at least)."""
    rows = t.shape[0]
    per_row = max(1, math.prod(t.shape[1:]))
    step = max(1, (values or BLOCK_VALUES * torch.get_num_threads()) // per_row)
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of `shape` and `dtype` holding arbitrary values, whose memory every later
    call with the same name and dtype in this thread reuses: a caller must be done with
    it before calling again, and must not return it."""
    # The views handed out are kept by shape too: a pass asks for the same few shapes
    # once per row block, and making a view costs more than looking one up.
    views: dict[tuple[str, torch.dtype, tuple[int, ...]], torch.Tensor]
    views = _local.__dict__.setdefault("views", {})
    view = views.get((name, dtype, shape))
    # (A view an `out=` argument resized no longer has its shape: made again.)
    if view is not None and view.shape == shape:
        return view
    pool: dict[tuple[str, torch.dtype], torch.Tensor] = _local.__dict__.setdefault("pool", {})
    numel = math.prod(shape)
    buf = pool.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = pool[name, dtype] = torch.empty(numel, dtype=dtype)
        # Views of the smaller buffer would keep it alive and stop sharing memory.
        for key in [k for k in views if k[:2] == (name, dtype)]:
            del views[key]
    view = views[name, dtype, shape] = buf[:numel].view(shape)
    return view


def ones(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of ones of `shape`, from one filled buffer per dtype and thread (callers
    must not write to it)."""
    filled: dict[torch.dtype, torch.Tensor] = _local.__dict__.setdefault("ones", {})
    numel = math.prod(shape)
    buf = filled.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = filled[dtype] = torch.ones(numel, dtype=dtype)
    return buf[:numel].view(shape)
