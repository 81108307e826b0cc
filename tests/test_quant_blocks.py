"""The quantizer's vectorised pieces against plain loops: packing, the clip search over
all factors at once, row blocks, and the GPTQ column loop with lazy updates."""

from __future__ import annotations

import math

import pytest
import torch

from weightops.quant import blocks, clipsearch, grids, mixed
from weightops.quant.gptq import gptq_codes, inverse_factor
from weightops.quant.packing import pack_codes


def _weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("bits", [2, 4])
def test_packed_words_equal_words_built_bit_by_bit(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 96), generator=g)
    codes[0] = 2**bits - 1
    words = pack_codes(codes, bits)
    per = 32 // bits
    for r in range(codes.shape[0]):
        for j in range(codes.shape[1] // per):
            value = 0
            for i in range(per):
                value |= int(codes[r, j * per + i]) << (bits * i)
            signed = value - 2**32 if value >= 2**31 else value
            assert words[r, j].item() == signed


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_clip_search_picks_the_factor_a_loop_over_factors_picks(bits, weighted):
    g = torch.Generator().manual_seed(7)
    groups = torch.randn(6, 5, 64, generator=g) * 0.02
    groups[0, 0] = 0.01  # a constant group: every factor ties, the first one wins
    h = torch.rand(5, 64, generator=g) + 0.1 if weighted else None
    s, lo = grids._grid(groups, h, bits, grids.CLIP_GRID)
    levels = 2**bits - 1
    for r in range(groups.shape[0]):
        for k in range(groups.shape[1]):
            x = groups[r, k].double()
            weight = torch.ones(64, dtype=torch.float64) if h is None else h[k].double()
            lo0, hi0 = x.min().item(), x.max().item()
            mid = (lo0 + hi0) / 2
            errors, candidates = [], []
            for c in grids.CLIP_GRID:
                a, b = mid - (mid - lo0) * c, mid + (hi0 - mid) * c
                step = max((b - a) / levels, 1e-12)
                q = ((x - a) / step).round().clamp(0, levels)
                errors.append(float(((q * step + a - x) ** 2 * weight).sum()))
                candidates.append((step, a))
            best = min(errors)
            # Factors within rounding noise of the best are equally right.
            near = [i for i, e in enumerate(errors) if e <= best * (1 + 1e-4) + 1e-18]
            assert any(
                math.isclose(s[r, k].item(), candidates[i][0], rel_tol=1e-5)
                and math.isclose(lo[r, k].item(), candidates[i][1], rel_tol=1e-5, abs_tol=1e-9)
                for i in near
            ), (r, k)
    assert torch.equal(s[0, 0], s[0, 0].new_tensor(1e-12))


@pytest.mark.parametrize(
    "options", [{}, {"outliers": 2}, {"k4": 0, "refine": False}, {"importance": "h"}]
)
def test_results_do_not_depend_on_the_row_block_size(monkeypatch, options):
    w = _weight(40, 256, 3)
    if options.get("importance") == "h":
        options = {"importance": torch.rand(256, generator=torch.Generator().manual_seed(1))}
    whole = mixed.quantize_with_reference(w, **options)
    monkeypatch.setattr(blocks, "BLOCK_VALUES", 1)  # one row per block
    monkeypatch.setattr(clipsearch, "CHUNK_VALUES", 1)  # one row per clip-search chunk
    rows = mixed.quantize_with_reference(w, **options)
    assert torch.equal(whole[1], rows[1])
    for name, part in whole[0].parts().items():
        assert torch.equal(part, rows[0].parts()[name]), name


def _gptq_loop(w, u, s, lo, top, group_size):
    """Column by column, every later column updated at once: the unblocked algorithm."""
    work = w.clone()
    codes = torch.empty_like(w)
    for i in range(w.shape[1]):
        g = i // group_size
        q = ((work[:, i] - lo[:, g]) / s[:, g]).round().clamp(min=0)
        q = torch.minimum(q, top[:, g])
        codes[:, i] = q
        err = (work[:, i] - (q * s[:, g] + lo[:, g])) / u[i, i]
        work[:, i + 1 :] -= err[:, None] * u[i, i + 1 :][None, :]
    return codes, work


def _upper_inverse_factor(hessian, damp):
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.linalg.inv(h)).T.float()


def test_blocked_gptq_matches_the_column_loop():
    g = torch.Generator().manual_seed(5)
    out_f, in_f, gs = 24, 192, 64
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    x = torch.randn(1024, in_f, generator=g) @ (torch.randn(in_f, in_f, generator=g) * 0.2)
    hessian = x.T @ x / 1024
    wg = w.reshape(out_f, -1, gs)
    lo = wg.amin(-1)
    s = (wg.amax(-1) - lo) / 3
    is4 = torch.zeros(out_f, in_f // gs, dtype=torch.bool)
    is4[:, 1] = True
    s = torch.where(is4, s / 5, s)
    top = torch.where(is4, 15.0, 3.0)
    codes, seen = gptq_codes(w, hessian, s, lo, is4, gs, None, 0.01, block=32)
    ref_codes, ref_seen = _gptq_loop(w, _upper_inverse_factor(hessian, 0.01), s, lo, top, gs)
    # Lazy updates add the same terms in another order: codes agree but for the rare
    # weight that lands on a rounding boundary.
    assert (codes == ref_codes).float().mean() > 0.995
    assert torch.allclose(seen, ref_seen, atol=1e-4)


def _gptq_loop_in_order(w, u, s, lo, top, group_size, order):
    """The column loop visiting inputs in `order`, each with its own group's grid; u is
    the inverse factor of the Hessian permuted to that order."""
    work = w[:, order].clone()
    codes = torch.empty_like(w)
    for i, col in enumerate(order.tolist()):
        g = col // group_size
        q = ((work[:, i] - lo[:, g]) / s[:, g]).round().clamp(min=0)
        q = torch.minimum(q, top[:, g])
        codes[:, col] = q
        err = (work[:, i] - (q * s[:, g] + lo[:, g])) / u[i, i]
        work[:, i + 1 :] -= err[:, None] * u[i, i + 1 :][None, :]
    seen = torch.empty_like(w)
    seen[:, order] = work
    return codes, seen


def test_act_order_visits_inputs_by_decreasing_hessian_diagonal():
    g = torch.Generator().manual_seed(9)
    out_f, in_f, gs = 16, 128, 64
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    scales = torch.rand(in_f, generator=g) * 3
    x = torch.randn(512, in_f, generator=g) * scales
    hessian = x.T @ x / 512
    wg = w.reshape(out_f, -1, gs)
    lo = wg.amin(-1)
    s = (wg.amax(-1) - lo) / 3
    is4 = torch.zeros(out_f, in_f // gs, dtype=torch.bool)
    top = torch.full_like(s, 3.0)
    order = torch.tensor(sorted(range(in_f), key=lambda i: -float(hessian[i, i])))
    u = _upper_inverse_factor(hessian[order][:, order], 0.01)
    ref_codes, ref_seen = _gptq_loop_in_order(w, u, s, lo, top, gs, order)
    codes, seen = gptq_codes(w, hessian, s, lo, is4, gs, None, 0.01, block=32, act_order=True)
    assert (codes == ref_codes).float().mean() > 0.995
    assert torch.allclose(seen, ref_seen, atol=1e-4)
    plain, _ = gptq_codes(w, hessian, s, lo, is4, gs, None, 0.01, block=32)
    assert not torch.equal(plain, codes)


def test_inverse_factor_is_recomputed_for_a_changed_hessian():
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    hessian = x.T @ x / 256
    first = inverse_factor(hessian, 0.01)
    assert inverse_factor(hessian, 0.01) is first
    hessian.mul_(4)  # in place: the same object, other values
    again = inverse_factor(hessian, 0.01)
    assert torch.allclose(again, first / 2, rtol=1e-4)
    assert not torch.allclose(inverse_factor(hessian, 0.5), again)


def _ls_line(q, v, wt):
    """Weighted least-squares (s, lo) of v ≈ lo + q·s, float64, by the normal equations."""
    a, b, c = float((wt * q * q).sum()), float((wt * q).sum()), float(wt.sum())
    d, e = float((wt * q * v).sum()), float((wt * v).sum())
    det = a * c - b * b
    s = (c * d - b * e) / det
    return s, (e - b * s) / c


@pytest.mark.parametrize("weighted", [False, True])
def test_closed_form_2bit_search_matches_rounding_each_factor(weighted):
    g = torch.Generator().manual_seed(11)
    groups = torch.distributions.StudentT(4.0).sample((5, 4, 64)).double().float() * 0.02
    groups[0, 0] = -0.003  # constant: no error at any factor
    h = torch.rand(4, 64, generator=g) + 0.1 if weighted else None
    factor, err, s1, lo1, *_ = clipsearch.search_2bit(groups, h, grids.CLIP2, need_error=True)
    for i in range(groups.shape[0]):
        for k in range(groups.shape[1]):
            v = groups[i, k].double()
            wt = torch.ones(64, dtype=torch.float64) if h is None else h[k].double()
            lo0, hi0 = v.min().item(), v.max().item()
            m, half = (lo0 + hi0) / 2, (hi0 - lo0) / 2
            errors, codes = [], []
            for c in grids.CLIP2:
                a, step = m - half * c, max(2 * half * c / 3, 1e-12)
                q = ((v - a) / step).round().clamp(0, 3)
                errors.append(float(((q * step + a - v) ** 2 * wt).sum()))
                codes.append(q)
            best = min(errors)
            got = grids.CLIP2.index(round(factor[i, k].item(), 3))
            assert errors[got] <= best * (1 + 1e-4) + 1e-18, (i, k)
            assert math.isclose(
                err[i, k].item() * half**2, errors[got], rel_tol=1e-3, abs_tol=1e-12
            )
            # The first refinement step: the least-squares line through the codes of
            # the chosen grid.
            if half == 0:
                assert s1[i, k].item() == pytest.approx(1e-12) and lo1[
                    i, k
                ].item() == pytest.approx(m)
                continue
            s_ref, lo_ref = _ls_line(codes[got], v, wt)
            assert math.isclose(s1[i, k].item(), s_ref, rel_tol=1e-4), (i, k)
            assert math.isclose(lo1[i, k].item(), lo_ref, rel_tol=1e-4, abs_tol=1e-6 * half)


def test_refined_error_is_the_error_of_the_last_codes_and_bounds_rounding_again():
    g = torch.Generator().manual_seed(5)
    groups = torch.randn(30, 64, generator=g).double() * 0.02
    h = torch.rand(30, 64, generator=g).double() + 0.1
    s0 = (groups.amax(-1) - groups.amin(-1)) / 3
    s, lo, err = grids._refine_with_error(groups, h, s0, groups.amin(-1), 2, steps=2)
    # The codes of the last step: rounding on the grid before the last update.
    s1, lo1 = grids._refine(groups, h, s0, groups.amin(-1), 2, steps=1)
    q = ((groups - lo1[:, None]) / s1[:, None]).round().clamp(0, 3)
    direct = ((q * s[:, None] + lo[:, None] - groups) ** 2 * h).sum(-1)
    assert torch.allclose(err, direct, rtol=1e-6, atol=1e-15)
    again = ((groups - lo[:, None]) / s[:, None]).round().clamp(0, 3)
    rounded = ((again * s[:, None] + lo[:, None] - groups) ** 2 * h).sum(-1)
    assert (rounded <= err * (1 + 1e-9) + 1e-15).all()
