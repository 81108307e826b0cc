"""GGML k-quants Q2_K and Q4_K: fitting a float matrix and packing the GGUF bytes.

Both k-quants cut a row into super-blocks of 256 weights; each super-block is split into
sub-blocks with an unsigned scale and an unsigned min, both small integers against two
fp16 super-scales d and dmin, and a weight is  d·scale·q − dmin·min.

Q2_K super-block, 84 bytes, sixteen sub-blocks of 16 weights:
  bytes  0–15  one byte per sub-block j: scale in the low nibble, min in the high nibble
  bytes 16–79  2-bit codes: weight 128·h + 32·k + i (h < 2, k < 4, i < 32) sits at
               bits 2k, 2k+1 of byte 16 + 32·h + i
  bytes 80–81  d (fp16, little-endian); bytes 82–83  dmin (fp16)

Q4_K super-block, 144 bytes, eight sub-blocks of 32 weights:
  bytes  0–1   d (fp16); bytes 2–3  dmin (fp16)
  bytes  4–15  eight 6-bit scales s[j] and eight 6-bit mins m[j], with b = bytes 4–15:
               b[j]   = s[j]   | (s[j+4] >> 4) << 6        for j < 4
               b[j+4] = m[j]   | (m[j+4] >> 4) << 6        for j < 4
               b[j+8] = (s[j+4] & 15) | (m[j+4] & 15) << 4  for j < 4
  bytes 16–143 4-bit codes: weight 64·c + 32·h + i (c < 4, h < 2, i < 32) sits in the
               low (h = 0) or high (h = 1) nibble of byte 16 + 32·c + i

Choosing the numbers: each sub-block tries a few clipped ranges [lo, hi] (lo ≤ 0, so the
min is stored as a non-negative number), refits scale and min to the resulting codes by
least squares, and keeps the candidate with the least squared error. The scales and mins
are then rounded to integers against d = max scale / top and dmin = max min / top (top
15 for Q2_K, 63 for Q4_K), d and dmin are refit by least squares per super-block, and
the codes are chosen for the stored values, so the bytes dequantize exactly to what the
error was measured on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weightops.quant.mixed import QuantError

QK_K = 256
BLOCK_BYTES = {"Q2_K": 84, "Q4_K": 144}
BITS_PER_WEIGHT = {t: 8 * b / QK_K for t, b in BLOCK_BYTES.items()}
# (weights per sub-block, largest code, largest integer scale / min)
_LAYOUT = {"Q2_K": (16, 3, 15), "Q4_K": (32, 15, 63)}
# Shrink factors of a sub-block's range tried by the scale search.
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
_FP16_MAX = float(np.finfo(np.float16).max)
# Weights quantized per step of the export (bounds the temporaries to a few hundred MB).
_CHUNK_WEIGHTS = 1 << 21


@dataclass
class KQuant:
    """A k-quantized [rows, n] matrix before packing, nb = n / 256 super-blocks per row.

    codes  uint8 [rows, nb, 256]   q of every weight, in weight order
    scales uint8 [rows, nb, S]     integer scale of each sub-block (S = 16 or 8)
    mins   uint8 [rows, nb, S]     integer min of each sub-block
    d, dmin float16 [rows, nb]     super-scales of the scales and of the mins
    """

    qtype: str
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    d: np.ndarray
    dmin: np.ndarray

    def dequantize(self) -> np.ndarray:
        """float32 [rows, n]: d·scale·q − dmin·min, computed in float32."""
        rows, nb, _ = self.codes.shape
        sub = _LAYOUT[self.qtype][0]
        d = self.d.astype(np.float32)[..., None]
        dmin = self.dmin.astype(np.float32)[..., None]
        scale = np.repeat(d * self.scales.astype(np.float32), sub, axis=-1)
        low = np.repeat(dmin * self.mins.astype(np.float32), sub, axis=-1)
        return (scale * self.codes.astype(np.float32) - low).reshape(rows, nb * QK_K)

    def pack(self) -> np.ndarray:
        """uint8 [rows, nb · block bytes]: the GGUF bytes (see the module docstring)."""
        return pack_q2_k(self) if self.qtype == "Q2_K" else pack_q4_k(self)


# --- fitting ----------------------------------------------------------------------------


def _check_matrix(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % QK_K != 0:
        raise QuantError(
            f"k-quants need a 2-D matrix with rows a multiple of {QK_K}, got shape {list(w.shape)}"
        )
    if not np.isfinite(w).all():
        raise QuantError("the weight has NaN or Inf entries")
    return w


def _codes(x: np.ndarray, scale: np.ndarray, low: np.ndarray, top: int) -> np.ndarray:
    """Nearest codes in [0, top] for x ≈ scale·q + low (0 where the scale is 0)."""
    safe = np.where(scale > 0, scale, 1.0)
    q = np.rint((x - low[..., None]) / safe[..., None])
    q = np.clip(q, 0, top)
    return np.where(scale[..., None] > 0, q, 0.0)


def _sq_err(x: np.ndarray, q: np.ndarray, scale: np.ndarray, low: np.ndarray) -> np.ndarray:
    return np.square(q * scale[..., None] + low[..., None] - x).sum(-1)


def _fit_sub_blocks(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (last axis) scale ≥ 0 and low ≤ 0 with x ≈ scale·q + low."""
    lo0 = np.minimum(x.min(-1), 0.0)
    hi0 = np.maximum(x.max(-1), lo0)
    mid = (lo0 + hi0) / 2
    n = x.shape[-1]
    sum_x = x.sum(-1)
    best_err = best_s = best_lo = None
    for c in CLIPS:
        lo = np.minimum(mid - (mid - lo0) * c, 0.0)
        hi = mid + (hi0 - mid) * c
        s = (hi - lo) / top
        q = _codes(x, s, lo, top)
        # Least-squares refit of (scale, low) to these codes.
        sq, sqq, sqx = q.sum(-1), np.square(q).sum(-1), (q * x).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        det = np.where(ok, det, 1.0)
        s_fit = np.where(ok, (n * sqx - sq * sum_x) / det, s)
        lo_fit = np.where(ok, (sqq * sum_x - sq * sqx) / det, lo)
        # Keep the constraints: a positive low becomes 0 with the scale refit alone.
        pos = lo_fit > 0
        s_fit = np.where(pos, sqx / np.where(sqq > 0, sqq, 1.0), s_fit)
        lo_fit = np.where(pos, 0.0, lo_fit)
        s_fit = np.maximum(s_fit, 0.0)
        for cand_s, cand_lo in ((s, lo), (s_fit, lo_fit)):
            err = _sq_err(x, _codes(x, cand_s, cand_lo, top), cand_s, cand_lo)
            if best_err is None:
                best_err, best_s, best_lo = err, cand_s, cand_lo
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_s = np.where(better, cand_s, best_s)
                best_lo = np.where(better, cand_lo, best_lo)
    return best_s, best_lo


def _to_fp16(values: np.ndarray) -> np.ndarray:
    if np.abs(values).max(initial=0.0) > _FP16_MAX:
        raise QuantError("the weights are too large for the fp16 super-scales of a k-quant")
    return values.astype(np.float16)


def _integers(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """values [..., S] ≥ 0 -> (fp16 super-scale [...], integers in [0, top] [..., S])."""
    sup = _to_fp16(values.max(-1) / top)
    s = sup.astype(np.float32)
    safe = np.where(s > 0, s, 1.0)
    ints = np.where(s[..., None] > 0, np.clip(np.rint(values / safe[..., None]), 0, top), 0)
    return sup, ints.astype(np.uint8)


def _fit(w: np.ndarray, qtype: str) -> KQuant:
    w = _check_matrix(w)
    rows, n = w.shape
    nb = n // QK_K
    sub, top, int_top = _LAYOUT[qtype]
    x = w.reshape(rows, nb, QK_K // sub, sub)
    scale, low = _fit_sub_blocks(x, top)
    d, sc = _integers(scale, int_top)
    dmin, mn = _integers(-low, int_top)

    def codes_for(d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
        s = d.astype(np.float32)[..., None] * sc
        lo = -(dmin.astype(np.float32)[..., None] * mn)
        return _codes(x, s, lo, top)

    def block_err(q: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
        s = d.astype(np.float32)[..., None] * sc
        lo = -(dmin.astype(np.float32)[..., None] * mn)
        return _sq_err(x, q, s, lo).sum(-1)

    q = codes_for(d, dmin)
    # Least-squares refit of d and dmin per super-block to the integer scales and codes:
    # x ≈ d·a − dmin·m with a = scale·q and m = min, elementwise.
    a = (sc[..., None] * q).reshape(rows, nb, QK_K)
    m = np.repeat(mn.astype(np.float32), sub, axis=-1)
    xf = x.reshape(rows, nb, QK_K)
    saa, smm, sam = np.square(a).sum(-1), np.square(m).sum(-1), (a * m).sum(-1)
    sax, smx = (a * xf).sum(-1), (m * xf).sum(-1)
    det = saa * smm - sam * sam
    ok = det > 1e-12 * np.maximum(saa * smm, 1e-30)
    det = np.where(ok, det, 1.0)
    d_fit = np.where(ok, (sax * smm - smx * sam) / det, d.astype(np.float32))
    dmin_fit = np.where(ok, (sax * sam - smx * saa) / det, dmin.astype(np.float32))
    d_fit = _to_fp16(np.maximum(d_fit, 0.0))
    dmin_fit = _to_fp16(np.maximum(dmin_fit, 0.0))
    q_fit = codes_for(d_fit, dmin_fit)
    better = block_err(q_fit, d_fit, dmin_fit) < block_err(q, d, dmin)
    d = np.where(better, d_fit, d)
    dmin = np.where(better, dmin_fit, dmin)
    q = np.where(better[..., None, None], q_fit, q)
    return KQuant(
        qtype=qtype,
        codes=q.reshape(rows, nb, QK_K).astype(np.uint8),
        scales=sc,
        mins=mn,
        d=d,
        dmin=dmin,
    )


def fit_q2_k(w: np.ndarray) -> KQuant:
    """Q2_K codes, scales and super-scales of a float32 [rows, n] matrix (n % 256 == 0)."""
    return _fit(w, "Q2_K")


def fit_q4_k(w: np.ndarray) -> KQuant:
    """Q4_K codes, scales and super-scales of a float32 [rows, n] matrix (n % 256 == 0)."""
    return _fit(w, "Q4_K")


# --- packing ----------------------------------------------------------------------------


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype("<f2")[..., None].view(np.uint8)


def pack_q2_k(k: KQuant) -> np.ndarray:
    rows, nb, _ = k.codes.shape
    head = (k.scales & 0xF) | (k.mins << 4)
    # codes [rows, nb, h, k, i] -> byte 32·h + i gets code (h, k, i) at bits 2k.
    c = k.codes.reshape(rows, nb, 2, 4, 32).astype(np.uint8)
    qs = c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6)
    block = np.concatenate(
        [head, qs.reshape(rows, nb, 64), _fp16_bytes(k.d), _fp16_bytes(k.dmin)], axis=-1
    )
    return block.reshape(rows, nb * BLOCK_BYTES["Q2_K"])


def pack_q4_k(k: KQuant) -> np.ndarray:
    rows, nb, _ = k.codes.shape
    s, m = k.scales, k.mins
    packed = np.concatenate(
        [
            (s[..., :4] & 63) | ((s[..., 4:] >> 4) << 6),
            (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
            (s[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
        ],
        axis=-1,
    )
    # codes [rows, nb, c, h, i] -> byte 32·c + i, low nibble h = 0, high nibble h = 1.
    c = k.codes.reshape(rows, nb, 4, 2, 32).astype(np.uint8)
    qs = c[:, :, :, 0] | (c[:, :, :, 1] << 4)
    block = np.concatenate(
        [_fp16_bytes(k.d), _fp16_bytes(k.dmin), packed, qs.reshape(rows, nb, 128)], axis=-1
    )
    return block.reshape(rows, nb * BLOCK_BYTES["Q4_K"])


def quantize_q2_k(w: np.ndarray) -> np.ndarray:
    """float32 [rows, n] -> Q2_K bytes uint8 [rows, n / 256 · 84]."""
    return pack_q2_k(fit_q2_k(w))


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """float32 [rows, n] -> Q4_K bytes uint8 [rows, n / 256 · 144]."""
    return pack_q4_k(fit_q4_k(w))


def quantize_rows(w: np.ndarray, qtype: str) -> np.ndarray:
    """`quantize_q2_k` / `quantize_q4_k` a few rows at a time, to bound the temporaries."""
    w = _check_matrix(w)
    step = max(1, _CHUNK_WEIGHTS // max(1, w.shape[1]))
    fit = fit_q2_k if qtype == "Q2_K" else fit_q4_k
    parts = [fit(w[r : r + step]).pack() for r in range(0, w.shape[0], step)]
    if not parts:
        return np.zeros((0, w.shape[1] // QK_K * BLOCK_BYTES[qtype]), dtype=np.uint8)
    return np.concatenate(parts, axis=0)
