"""weightops.kernels: the torch reference on CPU, backend choice, and CuPy parity on a GPU.

The parity tests are marked `gpu` and skip without a CUDA device and cupy; elsewhere the
whole suite runs through the torch backend.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightops import kernels
from weightops.quant.mixed import dequantize, quantize


def _decaying(batch: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Matrices with singular values 0.8^i, like the spectra of fine-tuning deltas."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(batch, m, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(batch, n, r, generator=g))
    s = 0.8 ** torch.arange(r, dtype=torch.float32)
    return (u * s) @ v.mT


def test_svd_reconstructs_and_matches_numpy():
    x = torch.randn(3, 20, 12, generator=torch.Generator().manual_seed(1))
    u, s, vh = kernels.svd(x)
    torch.testing.assert_close((u * s[..., None, :]) @ vh, x, atol=1e-5, rtol=1e-5)
    expected = np.linalg.svd(x.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 300, 120), (2, 120, 300)])
def test_truncated_svd_finds_the_leading_triplets(shape):
    x = _decaying(*shape)
    k = 10
    u, s, vh = kernels.truncated_svd(x, k, generator=torch.Generator().manual_seed(0))
    assert u.shape == (*shape[:-1], k) and vh.shape == (shape[0], k, shape[-1])
    expected = np.linalg.svd(x.double().numpy(), compute_uv=False)[:, :k]
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-4)
    best = np.linalg.svd(x.double().numpy(), compute_uv=False)[:, k]  # σ_{k+1}
    err = torch.linalg.matrix_norm(x - (u * s[..., None, :]) @ vh, ord=2)
    # The docstring's bound: within a factor 3 of the best rank-k error with 2 power steps.
    assert (err.double().numpy() <= 3 * best).all()


def test_polar_factor_is_orthonormal_and_nearest():
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    p = kernels.polar(x)
    torch.testing.assert_close(p.T @ p, torch.eye(5), atol=1e-5, rtol=0)
    # Among orthonormal-column matrices it is the closest: better than a QR factor.
    q, _ = torch.linalg.qr(x)
    assert (p - x).norm() <= (q - x).norm() + 1e-6


@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (3, 30, 30)])
def test_polar_matches_the_svd_form(shape):
    # The Gram form serves well-conditioned inputs; numpy's SVD gives U Vᵀ independently.
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    u, _, vt = np.linalg.svd(x.double().numpy(), full_matrices=False)
    np.testing.assert_allclose(kernels.polar(x).numpy(), u @ vt, rtol=0, atol=1e-5)


def test_polar_of_a_rank_deficient_matrix_is_still_a_polar_factor():
    # Repeated columns: xᵀx is singular, (xᵀx)^(−1/2) does not exist, the factor is not
    # unique; any valid one has orthonormal columns and x = p·H with H = pᵀx symmetric
    # positive semi-definite.
    a = torch.randn(50, 4, generator=torch.Generator().manual_seed(5))
    x = torch.cat([a, a], dim=1)
    p = kernels.polar(x).double()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.T @ p, torch.eye(8, dtype=p.dtype), atol=1e-5, rtol=0)
    h = p.T @ x.double()
    torch.testing.assert_close(h, h.T, atol=1e-5, rtol=0)
    assert float(torch.linalg.eigvalsh((h + h.T) / 2).min()) > -1e-5
    torch.testing.assert_close(p @ h, x.double(), atol=1e-5, rtol=0)


def test_linear_assignment_solves_small_problems_exactly():
    from itertools import permutations

    g = torch.Generator().manual_seed(3)
    score = torch.randn(6, 6, generator=g)
    best = max(permutations(range(6)), key=lambda p: sum(score[i, p[i]] for i in range(6)))
    assert kernels.linear_assignment(score).tolist() == list(best)
    worst = min(permutations(range(6)), key=lambda p: sum(score[i, p[i]] for i in range(6)))
    assert kernels.linear_assignment(score, maximize=False).tolist() == list(worst)


def test_matmul_computes_16bit_inputs_in_float32_on_cpu():
    a = torch.randn(4, 8).bfloat16()
    b = torch.randn(8, 3).bfloat16()
    out = kernels.matmul(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, a.float() @ b.float())
    assert kernels.matmul(a, b, dtype=torch.float64).dtype == torch.float64


def test_backend_choice(monkeypatch):
    t = torch.zeros(2)
    assert kernels.backend(t) == "torch"  # CPU tensors always use the reference
    monkeypatch.setenv("WEIGHTOPS_BACKEND", "cupy")
    assert kernels.backend(t) == "torch"
    monkeypatch.setenv("WEIGHTOPS_BACKEND", "numba")
    with pytest.raises(ValueError, match="WEIGHTOPS_BACKEND"):
        kernels.backend(t)


def test_quant_matmul_reference_equals_the_dequantized_product():
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(4)) * 0.02
    p = quantize(w, outliers=2)
    x = torch.randn(3, 5, 256)
    torch.testing.assert_close(kernels.quant_matmul(x, p), x @ dequantize(p).T)


# ------------------------------------------------------------------ GPU parity


def _cuda_cupy() -> bool:
    if not torch.cuda.is_available():
        return False
    from weightops.kernels import cupy_backend

    return cupy_backend.available()


gpu = pytest.mark.skipif(not _cuda_cupy(), reason="needs a CUDA device and cupy")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("outliers", [0, 3])
@pytest.mark.parametrize("batch", [1, 7])
def test_cupy_quant_matmul_matches_the_torch_reference(group_size, outliers, batch):
    from weightops.kernels import cupy_backend

    g = torch.Generator().manual_seed(group_size + outliers)
    w = torch.randn(512, 2048, generator=g) * 0.02
    w[:, :group_size] *= 10  # some rows get 4-bit groups, not all at the same place
    p = quantize(w, group_size=group_size, avg_bits=2.9, outliers=outliers)
    assert 0 < p.k4 < 2048 // group_size
    x = torch.randn(batch, 2048, generator=g)
    expected = (x.double() @ dequantize(p).double().T).float()
    got = cupy_backend.quant_matmul(x.cuda(), p).cpu()
    # fp32 accumulation in a different order (and an fp16 weight copy for batches):
    # relative to the output's scale, well under the 2-bit quantization error.
    scale = expected.abs().max()
    tol = 1e-5 if batch == 1 else 2e-3
    assert ((got - expected).abs().max() / scale).item() < tol


@pytest.mark.gpu
@gpu
def test_cupy_dequantize_is_exact_in_fp16():
    from weightops.kernels import cupy_backend

    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(5)) * 0.02
    p = quantize(w, k4=4, outliers=1)
    got = cupy_backend.dequantize(p, torch.device("cuda")).cpu()
    torch.testing.assert_close(got, dequantize(p).half(), atol=0, rtol=1e-3)


@pytest.mark.gpu
@gpu
def test_cuda_tensors_cross_to_cupy_without_a_copy():
    import cupy

    t = torch.arange(10, dtype=torch.float32, device="cuda")
    a = cupy.from_dlpack(t)
    a[0] = 42.0
    assert t[0].item() == 42.0


# ------------------------------------------- the CUDA source, emulated on the CPU

_PRELUDE = r"""
#include <cmath>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
struct __half { _Float16 v; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half(float f) { __half h; h.v = (_Float16)f; return h; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
struct Dim { unsigned x; };
static Dim blockIdx, blockDim, threadIdx;
"""

_HARNESS = r"""
#define GRID(total) blockDim.x = 256; \
  for (unsigned b = 0; b < (unsigned)(((total) + 255) / 256); ++b) \
    for (unsigned t = 0; t < 256; ++t) { blockIdx.x = b; threadIdx.x = t;
extern "C" void run_gemv(const int* q2, const int* q4, const unsigned char* gm,
    const unsigned char* sc, const signed char* ze, const __half* sup, const int* oidx,
    const __half* oval, int n_out, const float* x, float* y, int rows, int in_f, int gs,
    int k4) {
  GRID(rows * 32) gemv_w24(q2, q4, gm, sc, ze, sup, oidx, oval, n_out, x, y, rows, in_f, gs, k4); }
}
extern "C" void run_dequant(const int* q2, const int* q4, const unsigned char* gm,
    const unsigned char* sc, const signed char* ze, const __half* sup, const int* oidx,
    const __half* oval, int n_out, __half* w, int rows, int in_f, int gs, int k4) {
  GRID((long long)rows * in_f) dequant_w24(q2, q4, gm, sc, ze, sup, oidx, oval, n_out, w, rows, in_f, gs, k4); }
  GRID(rows * n_out) scatter_outliers(oidx, oval, n_out, w, rows, in_f); }
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The kernels' CUDA source compiled for the CPU: every thread of the grid runs in
    turn, and the warp reduction becomes a sum over lanes. It checks the kernels'
    indexing (group map, code offsets, outliers) where no GPU is present."""
    import ctypes
    import shutil
    import subprocess

    from weightops.kernels.cupy_backend import _SOURCE

    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    reduction = (
        "    #pragma unroll\n"
        "    for (int off = 16; off > 0; off >>= 1) "
        "acc += __shfl_down_sync(0xffffffffu, acc, off);\n"
        "    if (lane == 0) y[row] = acc;"
    )
    assert reduction in _SOURCE
    source = _SOURCE.replace("#include <cuda_fp16.h>", "").replace(reduction, "    y[row] += acc;")
    source = source.replace('extern "C" __global__ void', "static void")
    folder = tmp_path_factory.mktemp("emu")
    (folder / "k.cpp").write_text(_PRELUDE + source + _HARNESS)
    built = subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-O1",
            "-shared",
            "-fPIC",
            "-Wno-unknown-pragmas",
            str(folder / "k.cpp"),
            "-o",
            str(folder / "k.so"),
        ],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:  # e.g. a compiler without _Float16
        pytest.skip(f"cannot build the emulation: {built.stderr[:200]}")
    return ctypes.CDLL(str(folder / "k.so"))


def _kernel_args(p):
    parts = [np.ascontiguousarray(t.numpy()) for t in (p.q2, p.q4, p.gmap, p.scale, p.zero)]
    parts.append(np.ascontiguousarray(p.super.numpy().view(np.uint16)))
    if p.outliers:
        parts.append(np.ascontiguousarray(p.oidx.to(torch.int32).numpy()))
        parts.append(np.ascontiguousarray(p.oval.numpy().view(np.uint16)))
    else:
        parts += [np.zeros(1, np.int32), np.zeros(1, np.uint16)]
    return parts


@pytest.mark.parametrize(
    "group_size, avg_bits, outliers", [(64, 2.5, 0), (64, 2.9, 3), (128, 3.6, 2), (16, 3.6, 1)]
)
def test_kernel_source_emulated_on_cpu_matches_the_reference(
    emulated, group_size, avg_bits, outliers
):
    import ctypes

    rows, in_f = 40, 1024
    g = torch.Generator().manual_seed(group_size + outliers)
    w = torch.randn(rows, in_f, generator=g) * 0.02
    w[:, :group_size] *= 10
    p = quantize(w, group_size=group_size, avg_bits=avg_bits, outliers=outliers)
    args = [a.ctypes.data_as(ctypes.c_void_p) for a in _kernel_args(p)]
    ints = [ctypes.c_int(v) for v in (rows, in_f, group_size, p.k4)]
    x = torch.randn(in_f, generator=g)
    xn = np.ascontiguousarray(x.numpy())
    y = np.zeros(rows, np.float32)
    emulated.run_gemv(
        *args,
        ctypes.c_int(outliers),
        xn.ctypes.data_as(ctypes.c_void_p),
        y.ctypes.data_as(ctypes.c_void_p),
        *ints,
    )
    expected = (dequantize(p).double() @ x.double()).numpy()
    assert np.abs(y - expected).max() / np.abs(expected).max() < 1e-5
    w16 = np.zeros((rows, in_f), np.uint16)
    emulated.run_dequant(*args, ctypes.c_int(outliers), w16.ctypes.data_as(ctypes.c_void_p), *ints)
    got = torch.from_numpy(w16.view(np.float16).astype(np.float32))
    assert torch.equal(got, dequantize(p).half().float())
