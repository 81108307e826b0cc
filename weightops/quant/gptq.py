"""GPTQ-style code choice (Frantar et al. 2023) for the mixed 2/4-bit quantizer.

Inputs are quantized in order; each one's rounding error, scaled by the inverse
Hessian's upper Cholesky factor U, is pushed onto the inputs not yet quantized, which
minimises the layer's output error ‖(W − Ŵ) X‖ rather than ‖W − Ŵ‖. The group grids
(s, lo and the width of every group) are fixed beforehand by the caller.

Columns go in blocks of `block`: inside a block the error of each column updates only
the block's later columns; the rest of the matrix gets the whole block's errors in one
matrix product (GPTQ's lazy batch update). The matrix is held transposed, one input per
row, so a column is a contiguous vector and its grid is a precomputed view.
"""

from __future__ import annotations

import torch

# Added to the Hessian's diagonal, as a share of its mean, by `weightops quantize --calib`.
# With GPTQ's usual 1% the codes fit the correlations of the calibration text itself:
# on SmolLM2-135M at 3.0 bits per weight (calibrated allocation), perplexity on a
# validation text that is neither the calibration text nor the benchmark's evaluation
# text was 32.6, 32.8, 31.7, 31.1 and 31.6 for 0.01, 0.03, 0.1, 0.3 and 1.0.
DAMP = 0.3

# Projections that read the same input (q/k/v, gate/up) are handed the same Hessian
# tensor by calibration, one after the other: the last factor is kept for the next.
_last: tuple[torch.Tensor, int, float, torch.Tensor] | None = None


def inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian, float32."""
    global _last
    if _last is not None and _last[0] is hessian and _last[1:3] == (hessian._version, damp):
        return _last[3]
    u = _inverse_factor(hessian, damp)
    _last = (hessian, hessian._version, damp, u)
    return u


def _inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    hess = hessian.detach().to(torch.float64).clone()
    diag = hess.diagonal()
    # An input that never fires carries no error: a unit diagonal keeps H invertible.
    diag[diag <= 0] = 1.0
    diag += damp * diag.mean()
    try:
        chol = torch.linalg.cholesky(hess)
    except torch.linalg.LinAlgError as e:
        from weightops.quant.mixed import QuantError

        raise QuantError(f"the calibration Hessian is not positive definite ({e})") from e
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()


def gptq_codes(
    w: torch.Tensor,
    hessian: torch.Tensor,
    s: torch.Tensor,
    lo: torch.Tensor,
    is4: torch.Tensor,
    group_size: int,
    outlier: torch.Tensor | None,
    damp: float,
    block: int = 128,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [out, in] chosen with error feedback through the inverse Hessian, and the
    weights as updated when each column was reached (the outliers' stored values).
    s, lo, is4: [out, groups] grid of every group. act_order: quantize the inputs in
    order of decreasing Hessian diagonal (GPTQ's act-order) instead of left to right;
    the grids are fixed beforehand, so only the order of the error feedback changes."""
    out_f, in_f = w.shape
    # Per-input copies of the group grids, one row per input: column i's grid is row i.
    s_in = s.t().repeat_interleave(group_size, 0)
    lo_in = lo.t().repeat_interleave(group_size, 0)
    top_in = torch.where(is4, 15.0, 3.0).t().repeat_interleave(group_size, 0)
    out_in = None if outlier is None else outlier.t()
    work = w.t()
    if act_order:
        perm = hessian.diagonal().argsort(descending=True, stable=True)
        u = _inverse_factor(hessian[perm][:, perm], damp)
        s_in, lo_in, top_in, work = s_in[perm], lo_in[perm], top_in[perm], work[perm]
        out_in = None if out_in is None else out_in[perm]
    else:
        u = inverse_factor(hessian, damp)
    s_in, lo_in, top_in = s_in.contiguous(), lo_in.contiguous(), top_in.contiguous()
    out_in = None if out_in is None else out_in.contiguous()
    work = work.contiguous()
    pivots = u.diagonal().tolist()
    codes = torch.empty(in_f, out_f)
    errs = torch.empty(in_f, out_f)
    rows = work.unbind(0)
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        for i in range(b0, b1):
            col = rows[i]
            q = torch.sub(col, lo_in[i]).div_(s_in[i]).round_().clamp_(min=0)
            q = torch.minimum(q, top_in[i], out=codes[i])
            deq = torch.mul(q, s_in[i]).add_(lo_in[i])
            if out_in is not None:
                deq = torch.where(out_in[i], col.half().float(), deq)
            err = torch.sub(col, deq, out=errs[i]).div_(pivots[i])
            if i + 1 < b1:
                work[i + 1 : b1] -= u[i, i + 1 : b1, None] * err
        if b1 < in_f:
            work[b1:] -= u[b0:b1, b1:].t() @ errs[b0:b1]
    if act_order:
        back = perm.argsort()
        codes, work = codes[back], work[back]
    # Contiguous codes keep every later tensor (the reference among them) in row order.
    return codes.t().contiguous(), work.t()
