"""The matrix quantizer's steps after the group grids: the grids stored two-level, the
codes rounded (row block by row block, weightops.quant.blocks) and packed, and the
outliers; each fills its parts of the stored form (layout in weightops.quant.mixed).
"""

from __future__ import annotations

import math

import torch

from weightops.quant import native
from weightops.quant.blocks import row_blocks, scratch
from weightops.quant.packing import LITTLE_ENDIAN, pack_bits, pack_codes


def index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= 2**15 - 1 else torch.int32


def empty_parts(
    out_f: int, in_f: int, group_size: int, k4: int, outliers: int
) -> dict[str, torch.Tensor]:
    """The stored tensors of a [out_f, in_f] matrix, to be filled block by block."""
    g = in_f // group_size
    parts = {
        "q2": torch.empty(out_f, (g - k4) * group_size // 16, dtype=torch.int32),
        "q4": torch.empty(out_f, k4 * group_size // 8, dtype=torch.int32),
        "gmap": torch.empty(out_f, math.ceil(g / 8), dtype=torch.uint8),
        "scale": torch.empty(out_f, g, dtype=torch.uint8),
        "zero": torch.empty(out_f, g, dtype=torch.int8),
        "super": torch.empty(out_f, 2, dtype=torch.float16),
    }
    if outliers:
        parts["oidx"] = torch.empty(out_f, outliers, dtype=index_dtype(in_f))
        parts["oval"] = torch.empty(out_f, outliers, dtype=torch.float16)
    return parts


def second_order(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit integers per group against one fp16 super-scale per row."""
    top = 127 if signed else 255
    big = values.abs().amax(-1) if signed else values.amax(-1)
    sup = (big / top).to(torch.float16).float().clamp_min(1e-12)
    q = (values / sup[:, None]).round_().clamp_(-top if signed else 0, top)
    return q, sup


def store_grids(
    parts: dict[str, torch.Tensor], is4: torch.Tensor, s: torch.Tensor, lo: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the group map and the two-level (s, lo); return the (s, lo) they dequantize
    to, which the codes are then chosen for."""
    s_q, s_sup = second_order(s, signed=False)
    lo_q, lo_sup = second_order(lo, signed=True)
    parts["gmap"].copy_(pack_bits(is4))
    parts["scale"].copy_(s_q)
    parts["zero"].copy_(lo_q)
    parts["super"].copy_(torch.stack([s_sup, lo_sup], dim=1))
    return (s_q * s_sup[:, None]).clamp_min_(1e-12), lo_q.mul_(lo_sup[:, None])


def pick_outliers(w: torch.Tensor, h: torch.Tensor | None, n: int) -> torch.Tensor:
    """[rows, in] mask of the n entries per row farthest from their group's mean,
    weighted by importance (ties in index order); w is [rows, groups, group_size]."""
    rows = w.shape[0]
    score = (w - w.mean(-1, keepdim=True)).square()
    if h is not None:
        score = score * h
    # A stable descending sort keeps the choice independent of the backend's topk order.
    idx = score.reshape(rows, -1).argsort(dim=1, descending=True, stable=True)[:, :n]
    mask = torch.zeros(rows, score[0].numel(), dtype=torch.bool)
    return mask.scatter_(1, idx, True)


def round_codes(
    w: torch.Tensor,
    is4: torch.Tensor,
    s: torch.Tensor,
    lo: torch.Tensor,
    reference: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Each weight of w [rows, G, group_size] rounded to its group's grid, row block by
    row block: the codes (uint8, same shape, in memory the next call reuses), and per row
    in float64 the squared error of what they dequantize to and Σw². With `reference`
    ([rows, in]) the dequantized weights go there instead, and the error is left to the
    caller (None)."""
    codes = scratch("codes", tuple(w.shape), torch.uint8)
    top = torch.where(is4, 15.0, 3.0)
    err, norm = w.new_empty(2, *w.shape[:-1]).unbind(0)
    ref = None if reference is None else reference.view(w.shape)
    for rows in row_blocks(w):
        g = w[rows]
        s_b, lo_b = s[rows][..., None], lo[rows][..., None]
        torch.linalg.vector_norm(g, dim=-1, out=norm[rows])
        # t: the weight in steps of its grid; its code is t rounded and clamped to
        # [0, 3] or [0, 15] per group (one pass, as rounding to each width).
        t = torch.sub(g, lo_b, out=scratch("codes_t", tuple(g.shape), g.dtype)).div_(s_b)
        q = torch.round(t, out=scratch("codes_q", tuple(g.shape), g.dtype)).clamp_(min=0)
        torch.minimum(q, top[rows][..., None], out=q)
        codes[rows] = q
        if ref is not None:
            torch.mul(q, s_b, out=ref[rows]).add_(lo_b)
        else:
            # q·s + lo − g = (q − t)·s: the error in steps, scaled per group below.
            torch.linalg.vector_norm(t.sub_(q), dim=-1, out=err[rows])
    w_sq = norm.square_().sum(-1, dtype=torch.float64)
    if ref is not None:
        return codes, None, w_sq
    return codes, err.mul_(s).square_().sum(-1, dtype=torch.float64), w_sq


def round_packed(
    parts: dict[str, torch.Tensor],
    w: torch.Tensor,
    is4: torch.Tensor,
    s: torch.Tensor,
    lo: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`round_codes` and `store_codes` in one native pass (native.c's wo_round_pack), the
    codes packed as they are rounded: per row in float64 the squared error and Σw². None
    where the kernels are not at hand or do not take this group size."""
    rows, n_groups, group_size = w.shape
    if not (LITTLE_ENDIAN and native.ready(w)):
        return None
    k4 = parts["q4"].shape[1] * 8 // group_size
    err, norm = w.new_empty(2, rows, n_groups).unbind(0)
    s, lo = s.contiguous(), lo.contiguous()
    q2, q4 = (parts[f"q{b}"].view(torch.uint8) for b in (2, 4))
    native.run("wo_round_pack", rows, w, s, lo, is4.contiguous(), q2, q4, err, norm,
               n_groups, k4, group_size)  # fmt: skip
    # The error comes in steps of each group's grid, squared: scaled to weights here.
    return err.mul_(s).mul_(s).sum(-1, dtype=torch.float64), norm.sum(-1, dtype=torch.float64)


def store_codes(parts: dict[str, torch.Tensor], codes: torch.Tensor, is4: torch.Tensor) -> None:
    """Pack codes [rows, G, group_size] into q2 and q4."""
    rows = codes.shape[0]
    by_group = codes.reshape(-1, codes.shape[-1])
    for bits, mask in ((2, ~is4), (4, is4)):
        # Each row holds as many groups of either width, so the selected groups, in
        # row-major order, are whole rows of the packed part.
        if parts[f"q{bits}"].numel():
            chosen = by_group.index_select(0, mask.reshape(-1).nonzero().squeeze(1))
            parts[f"q{bits}"].copy_(pack_codes(chosen.reshape(rows, -1), bits))


def store_outliers(
    parts: dict[str, torch.Tensor],
    outlier: torch.Tensor,
    seen: torch.Tensor,
    reference: torch.Tensor,
) -> None:
    """Store the outliers (mask [rows, in]) with their values in `seen`, and put those
    values into the dequantized matrix."""
    rows = outlier.shape[0]
    cols = outlier.nonzero()[:, 1].reshape(rows, -1)
    oval = seen.reshape(rows, -1).gather(1, cols).half()
    parts["oidx"].copy_(cols)
    parts["oval"].copy_(oval)
    reference.scatter_(1, cols, oval.float())
