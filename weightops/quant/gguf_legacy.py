"""GGML's legacy block types Q4_0 and Q5_0, for rows too short for a k-quant super-block.

llama.cpp's quantizer (llama-quant.cpp) falls back for a matrix whose rows are not a
multiple of 256: Q2_K and Q3_K become Q4_0, Q4_K becomes Q5_0 (and a row that is not a
multiple of 32 either stays F16). The export makes the same choice, so a model with a
hidden size such as 576 is still quantized in every block linear.

Both types cut a row into blocks of 32 weights with one fp16 scale d and no min; a weight
is  d·(q − z)  with q in [0, 2z), z = 8 for Q4_0 and 16 for Q5_0.

Q4_0 block, 18 bytes:
  bytes 0–1    d (fp16, little-endian)
  bytes 2–17   byte 2 + j holds q[j] in the low nibble and q[j + 16] in the high one
Q5_0 block, 22 bytes:
  bytes 0–1    d (fp16)
  bytes 2–5    qh, a little-endian uint32: bit j is bit 4 of q[j] (j < 32)
  bytes 6–21   the low four bits of q, laid out as Q4_0's bytes 2–17

Choosing d. ggml's reference takes d = −(the weight of largest magnitude) / z, so that
weight lands exactly on code 0. Here each block also tries shrunken versions of that
scale (clipping the extreme weight) and a least-squares refit of d to each candidate's
codes, and keeps the candidate with the least squared error; the codes are chosen for
the stored fp16 d, so the bytes dequantize exactly to what the error was measured on.
"""

from __future__ import annotations

import numpy as np

from weightops.quant.mixed import QuantError

QK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q5_0": 22}
_ZERO = {"Q4_0": 8, "Q5_0": 16}
# Fractions of the reference scale tried per block.
SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_FP16_MAX = float(np.finfo(np.float16).max)
_CHUNK_WEIGHTS = 1 << 21


def _check(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % QK != 0:
        raise QuantError(
            f"Q4_0 / Q5_0 need a 2-D matrix with rows a multiple of {QK}, got shape {list(w.shape)}"
        )
    if not np.isfinite(w).all():
        raise QuantError("the weight has NaN or Inf entries")
    return w


def _codes(x: np.ndarray, d: np.ndarray, z: int) -> np.ndarray:
    """Nearest codes in [0, 2z) for x ≈ d·(q − z) (z where d is 0)."""
    safe = np.where(d != 0, d, 1.0)
    q = np.clip(np.rint(x / safe[..., None]) + z, 0, 2 * z - 1)
    return np.where(d[..., None] != 0, q, z)


def _err(x: np.ndarray, q: np.ndarray, d: np.ndarray, z: int) -> np.ndarray:
    return np.square(d[..., None] * (q - z) - x).sum(-1)


def fit_legacy(w: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 [rows, n] -> (codes uint8 [rows, n/32, 32], d float16 [rows, n/32])."""
    w = _check(w)
    z = _ZERO[qtype]
    rows, n = w.shape
    x = w.reshape(rows, n // QK, QK)
    idx = np.abs(x).argmax(-1)
    extreme = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    ref = -extreme / z
    best_err = best_d = None
    for shrink in SHRINKS:
        d = ref * shrink
        q = _codes(x, d, z)
        c = q - z
        cc = np.square(c).sum(-1)
        d_fit = np.where(cc > 0, (c * x).sum(-1) / np.where(cc > 0, cc, 1.0), d)
        for cand in (d, d_fit):
            err = _err(x, _codes(x, cand, z), cand, z)
            if best_err is None:
                best_err, best_d = err, cand
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_d = np.where(better, cand, best_d)
    if np.abs(best_d).max(initial=0.0) > _FP16_MAX:
        raise QuantError(f"the weights are too large for the fp16 scale of {qtype}")
    d16 = best_d.astype(np.float16)
    q = _codes(x, d16.astype(np.float32), z)
    return q.astype(np.uint8), d16


def dequantize_legacy(codes: np.ndarray, d: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [rows, n]: d·(q − z), computed in float32."""
    rows, nb, _ = codes.shape
    z = _ZERO[qtype]
    out = d.astype(np.float32)[..., None] * (codes.astype(np.float32) - z)
    return out.reshape(rows, nb * QK)


def pack_legacy(codes: np.ndarray, d: np.ndarray, qtype: str) -> np.ndarray:
    """uint8 [rows, n/32 · block bytes]: the GGUF bytes (see the module docstring)."""
    rows, nb, _ = codes.shape
    lo = codes & 15
    nibbles = lo[..., :16] | (lo[..., 16:] << 4)
    d_bytes = d.astype("<f2")[..., None].view(np.uint8)
    parts = [d_bytes]
    if qtype == "Q5_0":
        high = ((codes >> 4) & 1).astype(np.uint32)
        qh = (high << np.arange(QK, dtype=np.uint32)).sum(-1, dtype=np.uint32)
        parts.append(qh.astype("<u4")[..., None].view(np.uint8))
    parts.append(nibbles.astype(np.uint8))
    return np.concatenate(parts, axis=-1).reshape(rows, nb * BLOCK_BYTES[qtype])


def quantize_legacy(w: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [rows, n] -> Q4_0 / Q5_0 bytes, a few rows at a time to bound temporaries."""
    w = _check(w)
    step = max(1, _CHUNK_WEIGHTS // max(1, w.shape[1]))
    parts = [
        pack_legacy(*fit_legacy(w[r : r + step], qtype), qtype) for r in range(0, len(w), step)
    ]
    if not parts:
        return np.zeros((0, w.shape[1] // QK * BLOCK_BYTES[qtype]), dtype=np.uint8)
    return np.concatenate(parts, axis=0)
