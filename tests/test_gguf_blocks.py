"""GGUF block formats Q2_K / Q4_K / Q4_0 / Q5_0: packed bytes checked against the `gguf`
package's own dequantizer and against the formulas written out here."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from weightops.quant.gguf_kquants import (
    BLOCK_BYTES,
    KQuant,
    fit_q2_k,
    fit_q4_k,
    quantize_q2_k,
    quantize_q4_k,
)
from weightops.quant.gguf_legacy import (
    dequantize_legacy,
    fit_legacy,
    pack_legacy,
    quantize_legacy,
)
from weightops.quant.mixed import QuantError

QT = gguf.GGMLQuantizationType
FIT = {"Q2_K": fit_q2_k, "Q4_K": fit_q4_k}
QUANTIZE = {"Q2_K": quantize_q2_k, "Q4_K": quantize_q4_k}
# Relative Frobenius error on Gaussian weights (measured: Q2_K 0.269, Q4_K 0.074).
MAX_REL_ERR = {"Q2_K": 0.29, "Q4_K": 0.08}


def gaussian(rows: int = 64, n: int = 1024, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, n)) * 0.02).astype(np.float32)


def rel_err(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def expected(k: KQuant) -> np.ndarray:
    """d·scale·q − dmin·min written out per weight with plain loops over the sub-blocks,
    independently of KQuant.dequantize and of gguf."""
    rows, nb, _ = k.codes.shape
    sub = 256 // k.scales.shape[-1]
    out = np.empty((rows, nb, 256), dtype=np.float32)
    for j in range(k.scales.shape[-1]):
        d = k.d.astype(np.float32) * k.scales[..., j].astype(np.float32)
        m = k.dmin.astype(np.float32) * k.mins[..., j].astype(np.float32)
        q = k.codes[..., j * sub : (j + 1) * sub].astype(np.float32)
        out[..., j * sub : (j + 1) * sub] = d[..., None] * q - m[..., None]
    return out.reshape(rows, nb * 256)


def random_kquant(qtype: str, rows: int = 5, nb: int = 3, seed: int = 0) -> KQuant:
    """Every field random over its full range, so each bit of the layout is exercised."""
    rng = np.random.default_rng(seed)
    n_sub, top, int_top = {"Q2_K": (16, 3, 15), "Q4_K": (8, 15, 63)}[qtype]
    return KQuant(
        qtype=qtype,
        codes=rng.integers(0, top + 1, (rows, nb, 256), dtype=np.uint8),
        scales=rng.integers(0, int_top + 1, (rows, nb, n_sub), dtype=np.uint8),
        mins=rng.integers(0, int_top + 1, (rows, nb, n_sub), dtype=np.uint8),
        d=rng.uniform(1e-3, 1.0, (rows, nb)).astype(np.float16),
        dmin=rng.uniform(1e-3, 1.0, (rows, nb)).astype(np.float16),
    )


# --- block formats ----------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K"])
def test_packed_layout_matches_gguf_dequantizer(qtype):
    k = random_kquant(qtype)
    packed = k.pack()
    assert packed.dtype == np.uint8 and packed.shape == (5, 3 * BLOCK_BYTES[qtype])
    want = expected(k)
    np.testing.assert_array_equal(k.dequantize(), want)
    np.testing.assert_array_equal(gguf_dequantize(packed, QT[qtype]), want)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K"])
def test_single_codes_land_on_their_weight(qtype):
    """One nonzero code at a time, unit scales: gguf puts it back at the same index."""
    k = random_kquant(qtype, rows=1, nb=1)
    k.scales[:] = 1
    k.mins[:] = 0
    k.d[:] = 1.0
    for idx in (0, 1, 15, 16, 31, 32, 63, 64, 100, 127, 128, 200, 255):
        k.codes[:] = 0
        k.codes[0, 0, idx] = 1
        out = gguf_dequantize(k.pack(), QT[qtype]).ravel()
        assert np.nonzero(out)[0].tolist() == [idx]


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K"])
def test_quantize_is_exact_to_own_codes_and_accurate(qtype):
    w = gaussian()
    k = FIT[qtype](w)
    packed = QUANTIZE[qtype](w)
    assert packed.shape == (64, 1024 // 256 * BLOCK_BYTES[qtype])
    np.testing.assert_array_equal(packed, k.pack())
    ours = expected(k)
    np.testing.assert_array_equal(gguf_dequantize(packed, QT[qtype]), ours)
    assert rel_err(ours, w) < MAX_REL_ERR[qtype]


def test_q4_k_is_much_closer_than_q2_k():
    w = gaussian(seed=1)
    e2 = rel_err(fit_q2_k(w).dequantize(), w)
    e4 = rel_err(fit_q4_k(w).dequantize(), w)
    assert e4 < e2 / 3


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K"])
def test_awkward_blocks(qtype):
    rng = np.random.default_rng(2)
    w = np.zeros((6, 512), dtype=np.float32)
    w[1] = 0.5  # constant positive
    w[2] = -0.25  # constant negative
    w[3] = np.abs(rng.standard_normal(512))  # all positive: the min is clipped to 0
    w[4] = rng.standard_normal(512) * np.geomspace(1e-4, 10.0, 512)  # wide dynamic range
    w[5, ::97] = 3.0  # sparse spikes
    k = FIT[qtype](w)
    out = gguf_dequantize(k.pack(), QT[qtype])
    np.testing.assert_array_equal(out, expected(k))
    assert np.all(out[0] == 0)
    np.testing.assert_allclose(out[1:3], w[1:3], rtol=1e-3)
    assert rel_err(out[3:], w[3:]) < 0.5


@pytest.mark.parametrize("fit", [fit_q2_k, fit_q4_k])
def test_bad_matrices(fit):
    with pytest.raises(QuantError, match="multiple of 256"):
        fit(np.zeros((4, 320), dtype=np.float32))
    with pytest.raises(QuantError, match="multiple of 256"):
        fit(np.zeros(256, dtype=np.float32))
    bad = gaussian(2, 256)
    bad[1, 3] = np.nan
    with pytest.raises(QuantError, match="NaN"):
        fit(bad)
    with pytest.raises(QuantError, match="too large"):
        fit(np.full((1, 256), 1e9, dtype=np.float32))


# --- legacy blocks (Q4_0, Q5_0) ---------------------------------------------------------

ZERO = {"Q4_0": 8, "Q5_0": 16}
LEGACY_BYTES = {"Q4_0": 18, "Q5_0": 22}
# Relative Frobenius error on Gaussian weights (measured: Q4_0 0.082, Q5_0 0.042; ggml's
# reference quantizer 0.086 and 0.043).
LEGACY_MAX_REL_ERR = {"Q4_0": 0.09, "Q5_0": 0.045}


def legacy_expected(codes: np.ndarray, d: np.ndarray, qtype: str) -> np.ndarray:
    """d·(q − z) per weight, in a loop over the blocks."""
    rows, nb, _ = codes.shape
    out = np.empty((rows, nb * 32), dtype=np.float32)
    for b in range(nb):
        q = codes[:, b].astype(np.float32) - ZERO[qtype]
        out[:, b * 32 : (b + 1) * 32] = d[:, b, None].astype(np.float32) * q
    return out


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0"])
def test_legacy_layout_matches_gguf_dequantizer(qtype):
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 2 * ZERO[qtype], (5, 4, 32), dtype=np.uint8)
    d = rng.uniform(-1.0, 1.0, (5, 4)).astype(np.float16)
    packed = pack_legacy(codes, d, qtype)
    assert packed.dtype == np.uint8 and packed.shape == (5, 4 * LEGACY_BYTES[qtype])
    want = legacy_expected(codes, d, qtype)
    np.testing.assert_array_equal(dequantize_legacy(codes, d, qtype), want)
    np.testing.assert_array_equal(gguf_dequantize(packed, QT[qtype]), want)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0"])
def test_legacy_single_codes_land_on_their_weight(qtype):
    """All codes at zero but one, at its largest value (Q5_0: its fifth bit set)."""
    d = np.ones((1, 1), dtype=np.float16)
    for idx in (0, 1, 15, 16, 17, 31):
        codes = np.full((1, 1, 32), ZERO[qtype], dtype=np.uint8)
        codes[0, 0, idx] = 2 * ZERO[qtype] - 1
        out = gguf_dequantize(pack_legacy(codes, d, qtype), QT[qtype]).ravel()
        assert np.nonzero(out)[0].tolist() == [idx]
        assert out[idx] == ZERO[qtype] - 1


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0"])
def test_legacy_quantize_is_exact_to_own_codes_and_accurate(qtype):
    w = gaussian(64, 576)
    codes, d = fit_legacy(w, qtype)
    packed = quantize_legacy(w, qtype)
    np.testing.assert_array_equal(packed, pack_legacy(codes, d, qtype))
    ours = legacy_expected(codes, d, qtype)
    np.testing.assert_array_equal(gguf_dequantize(packed, QT[qtype]), ours)
    assert rel_err(ours, w) < LEGACY_MAX_REL_ERR[qtype]
    # Never worse than ggml's reference choice of d (the largest weight on code 0).
    ref = gguf_dequantize(gguf.quants.quantize(w, QT[qtype]), QT[qtype])
    assert rel_err(ours, w) <= rel_err(ref, w)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0"])
def test_legacy_awkward_blocks(qtype):
    w = np.zeros((4, 64), dtype=np.float32)
    w[1] = 0.5
    w[2] = -0.25
    w[3, ::7] = 3.0
    codes, d = fit_legacy(w, qtype)
    out = gguf_dequantize(pack_legacy(codes, d, qtype), QT[qtype])
    assert np.all(out[0] == 0)
    np.testing.assert_allclose(out[1:3], w[1:3], rtol=1e-3)
    np.testing.assert_allclose(out[3], w[3], atol=1e-3)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0"])
def test_legacy_bad_matrices(qtype):
    with pytest.raises(QuantError, match="multiple of 32"):
        fit_legacy(np.zeros((4, 48), dtype=np.float32), qtype)
    bad = gaussian(2, 32)
    bad[0, 0] = np.inf
    with pytest.raises(QuantError, match="NaN"):
        fit_legacy(bad, qtype)
    with pytest.raises(QuantError, match="too large"):
        fit_legacy(np.full((1, 32), 1e9, dtype=np.float32), qtype)
