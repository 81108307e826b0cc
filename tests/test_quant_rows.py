"""The quantizer's steps after the grids, and its shared pieces, against plain loops:
packing from bytes, rounding with the error in grid steps, the relative error of the
packed form, the vectorised first minimum, given per-group totals, reused memory."""

from __future__ import annotations

import pytest
import torch

from weightops.quant import blocks, clipsearch, grids, mixed, packing, rows


def _weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("bits", [2, 4])
def test_packing_from_bytes_equals_the_shift_and_sum_fallback(monkeypatch, bits):
    g = torch.Generator().manual_seed(bits + 10)
    codes = torch.randint(0, 2**bits, (9, 192), generator=g)
    codes[3] = 2**bits - 1  # every word's sign bit set
    fast = packing.pack_codes(codes.float(), bits)
    monkeypatch.setattr(packing, "LITTLE_ENDIAN", False)
    slow = packing.pack_codes(codes, bits)
    assert fast.dtype == slow.dtype == torch.int32
    assert torch.equal(fast, slow)
    assert torch.equal(packing.unpack_codes(fast, bits), codes)


def test_first_argmin_is_the_first_row_of_the_least_value():
    g = torch.Generator().manual_seed(2)
    err = torch.rand(6, 300, generator=g)
    err[:, :50] = 0.25  # all tied: the first row
    err[2:4, 50:100] = 0.01  # two tied minima: the earlier one
    err[:, 100] = 0.0
    got = clipsearch._first_argmin(err)
    for col in range(err.shape[1]):
        values = err[:, col].tolist()
        assert got[col].item() == values.index(min(values)), col


@pytest.mark.parametrize("with_reference", [False, True])
def test_rounding_gives_each_weights_nearest_code_and_the_error_of_its_value(with_reference):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(7, 3, 64, generator=g) * 0.02
    is4 = torch.zeros(7, 3, dtype=torch.bool)
    is4[:, 1] = True
    lo = w.amin(-1) * 0.9
    s = (w.amax(-1) - lo) / torch.where(is4, 15.0, 3.0) * 0.9
    reference = torch.empty(7, 3 * 64) if with_reference else None
    codes, sq_err, w_sq = rows.round_codes(w, is4, s, lo, reference)
    assert w_sq.dtype == torch.float64
    assert w_sq.tolist() == pytest.approx(w.double().square().sum((1, 2)).tolist(), rel=1e-6)
    expected_err = [0.0] * 7
    for r in range(7):
        for k in range(3):
            top = 15 if is4[r, k] else 3
            for i in range(64):
                x = w[r, k, i].item()
                q = min(max(round((x - lo[r, k].item()) / s[r, k].item()), 0), top)
                assert codes[r, k, i].item() == q, (r, k, i)
                expected_err[r] += (q * s[r, k].item() + lo[r, k].item() - x) ** 2
    if with_reference:
        assert sq_err is None
        assert torch.equal(reference, (codes.float() * s[..., None] + lo[..., None]).reshape(7, -1))
    else:
        assert sq_err.tolist() == pytest.approx(expected_err, rel=1e-5)


@pytest.mark.parametrize("options", [{}, {"outliers": 2}, {"k4": 0}])
def test_reported_error_is_that_of_the_dequantized_matrix(options):
    w = _weight(24, 384, 7)
    packed, err = mixed.quantize_with_error(w, **options)
    deq = mixed.dequantize(packed).double()
    expected = ((deq - w.double()).norm() / w.double().norm()).item()
    assert err == pytest.approx(expected, rel=1e-5)
    for name, part in mixed.quantize(w, **options).parts().items():
        assert torch.equal(part, packed.parts()[name]), name


def test_a_bf16_weight_quantizes_as_its_float32_values():
    w = _weight(16, 256, 8).bfloat16()
    a, err_a = mixed.quantize_with_error(w)
    b, err_b = mixed.quantize_with_error(w.float())
    assert err_a == err_b
    for name, part in a.parts().items():
        assert torch.equal(part, b.parts()[name]), name


@pytest.mark.parametrize("weighted", [False, True])
def test_refinement_with_given_totals_equals_refinement_computing_them(weighted):
    g = torch.Generator().manual_seed(6)
    groups = torch.randn(20, 5, 64, generator=g).double() * 0.02
    h = torch.rand(5, 64, generator=g).double() + 0.1 if weighted else None
    lo = groups.amin(-1)
    s = (groups.amax(-1) - lo) / 3
    hh = torch.ones_like(groups) if h is None else h.expand_as(groups)
    totals = (hh.sum(-1), (hh * groups).sum(-1), (hh * groups * groups).sum(-1))
    plain = grids._refine_with_error(groups, h, s, lo, 2, steps=2)
    given = grids._refine_with_error(groups, h, s, lo, 2, steps=2, totals=totals)
    for a, b in zip(plain, given, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-15)


def test_results_do_not_depend_on_the_search_chunk(monkeypatch):
    w = _weight(40, 256, 9)
    whole = mixed.quantize_with_reference(w)
    monkeypatch.setattr(clipsearch, "CHUNK_VALUES", 1)  # one row per chunk
    monkeypatch.setattr(blocks, "BLOCK_VALUES", 64)  # one group per block
    rows_ = mixed.quantize_with_reference(w)
    assert torch.equal(whole[1], rows_[1])
    for name, part in whole[0].parts().items():
        assert torch.equal(part, rows_[0].parts()[name]), name


def test_scratch_memory_is_reused_by_name_and_dtype():
    a = blocks.scratch("test_a", (4, 8))
    a.fill_(3.0)
    again = blocks.scratch("test_a", (2, 8))
    assert again.data_ptr() == a.data_ptr() and again.shape == (2, 8)
    assert blocks.scratch("test_b", (4, 8)).data_ptr() != a.data_ptr()
    wide = blocks.scratch("test_a", (4, 8), torch.float64)
    assert wide.dtype == torch.float64 and wide.data_ptr() != a.data_ptr()
    grown = blocks.scratch("test_a", (64, 64))
    assert grown.shape == (64, 64)
    ones = blocks.ones((3, 5))
    assert torch.equal(ones, torch.ones(3, 5))


@pytest.mark.parametrize("options", [{}, {"outliers": 2}, {"k4": 0}, {"k4": 6}])
def test_matrices_quantized_together_come_out_as_alone(options):
    weights = [_weight(5, 384, 11), _weight(12, 384, 12).bfloat16(), _weight(1, 384, 13)]
    together = mixed.quantize_together(weights, **options)
    for w, (packed, err) in zip(weights, together, strict=True):
        alone, alone_err = mixed.quantize_with_error(w, **options)
        assert packed.shape == alone.shape == tuple(w.shape)
        assert packed.parts().keys() == alone.parts().keys()
        for name, part in alone.parts().items():
            assert torch.equal(packed.parts()[name], part), name
        assert err == pytest.approx(alone_err, rel=1e-9)


def test_matrices_quantized_together_need_the_same_inputs_and_no_hessian():
    with pytest.raises(mixed.QuantError, match="same inputs"):
        mixed.quantize_together([_weight(4, 384, 1), _weight(4, 256, 2)])
    with pytest.raises(mixed.QuantError, match="one matrix"):
        mixed.quantize_together([_weight(4, 384, 1)] * 2, hessian=torch.eye(384))
    with pytest.raises(mixed.QuantError, match="no matrix"):
        mixed.quantize_together([])
