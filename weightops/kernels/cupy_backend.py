"""CuPy implementations behind `weightops.kernels`, for CUDA tensors.

Tensors cross between torch and CuPy through DLPack, sharing memory (no copies), and
every kernel runs on torch's current stream so it orders with the surrounding torch
work. Kernels are compiled on first use and cached per device by CuPy.

The fused 2/4-bit dequantize + GEMV reads the packed format of weightops.quant.mixed
directly: one warp per output row; each lane takes whole groups (lane, lane + 32, …),
issues the loads of a group's codes, scale and zero together before any arithmetic, so
the dequantization of one run of words overlaps the loads of the next, and uses
Σⱼ (qⱼ·s + lo)·xⱼ = s·Σⱼ qⱼxⱼ + lo·Σⱼ xⱼ, so dequantized weights are never formed.
Outliers are applied as a sparse correction afterwards. Batches larger than one
dequantize the matrix to fp16 once and multiply with cuBLAS through torch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_SOURCE = r"""
#include <cuda_fp16.h>

__device__ __forceinline__ int prefix4(const unsigned char* gm, int g) {
    // Number of 4-bit groups before group g in this row's group map.
    int n = 0;
    for (int b = 0; b < (g >> 3); ++b) n += __popc((unsigned)gm[b]);
    return n + __popc((unsigned)gm[g >> 3] & ((1u << (g & 7)) - 1u));
}

__device__ __forceinline__ float code_at(
    const int* r2, const int* r4, const unsigned char* gm, int col, int gs) {
    int g = col / gs, j = col - g * gs;
    int before = prefix4(gm, g);
    if ((gm[g >> 3] >> (g & 7)) & 1) {
        unsigned v = (unsigned)r4[before * (gs / 8) + j / 8];
        return (float)((v >> (4 * (j & 7))) & 15u);
    }
    unsigned v = (unsigned)r2[(g - before) * (gs / 16) + j / 16];
    return (float)((v >> (2 * (j & 15))) & 3u);
}

template <int BITS>
__device__ __forceinline__ void group_dot(
    const int* p, int words, const float* xg, float& dot, float& xs) {
    // All of a run of four words is loaded before any of it is used, so the loads of
    // the next words are in flight while these are dequantized.
    constexpr int PER = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    for (int w0 = 0; w0 < words; w0 += 4) {
        unsigned v[4];
        #pragma unroll
        for (int t = 0; t < 4; ++t) v[t] = (w0 + t < words) ? (unsigned)p[w0 + t] : 0u;
        #pragma unroll
        for (int t = 0; t < 4; ++t) {
            if (w0 + t < words) {
                #pragma unroll
                for (int i = 0; i < PER; ++i) {
                    const float xv = xg[(w0 + t) * PER + i];
                    dot += (float)((v[t] >> (BITS * i)) & MASK) * xv;
                    xs += xv;
                }
            }
        }
    }
}

extern "C" __global__ void gemv_w24(
    const int* __restrict__ q2, const int* __restrict__ q4,
    const unsigned char* __restrict__ gmap, const unsigned char* __restrict__ scale,
    const signed char* __restrict__ zero, const __half* __restrict__ sup,
    const int* __restrict__ oidx, const __half* __restrict__ oval, int n_out,
    const float* __restrict__ x, float* __restrict__ y,
    int rows, int in_f, int gs, int k4)
{
    const int row = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const int G = in_f / gs, GB = (G + 7) >> 3;
    const int* r2 = q2 + (long long)row * ((G - k4) * gs / 16);
    const int* r4 = q4 + (long long)row * (k4 * gs / 8);
    const unsigned char* gm = gmap + (long long)row * GB;
    const unsigned char* sc = scale + (long long)row * G;
    const signed char* ze = zero + (long long)row * G;
    const float S = __half2float(sup[2 * row]), L = __half2float(sup[2 * row + 1]);
    float acc = 0.f;
    for (int g = lane; g < G; g += 32) {
        const int before = prefix4(gm, g);
        const bool is4 = (gm[g >> 3] >> (g & 7)) & 1;
        const float s = fmaxf((float)sc[g] * S, 1e-12f);
        const float lo = (float)ze[g] * L;
        const float* xg = x + (long long)g * gs;
        float dot = 0.f, xs = 0.f;
        if (is4) group_dot<4>(r4 + before * (gs / 8), gs / 8, xg, dot, xs);
        else group_dot<2>(r2 + (g - before) * (gs / 16), gs / 16, xg, dot, xs);
        acc += s * dot + lo * xs;
    }
    for (int k = lane; k < n_out; k += 32) {
        const int col = oidx[(long long)row * n_out + k];
        const int g = col / gs;
        const float s = fmaxf((float)sc[g] * S, 1e-12f);
        const float deq = code_at(r2, r4, gm, col, gs) * s + (float)ze[g] * L;
        acc += (__half2float(oval[(long long)row * n_out + k]) - deq) * x[col];
    }
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) y[row] = acc;
}

extern "C" __global__ void dequant_w24(
    const int* __restrict__ q2, const int* __restrict__ q4,
    const unsigned char* __restrict__ gmap, const unsigned char* __restrict__ scale,
    const signed char* __restrict__ zero, const __half* __restrict__ sup,
    const int* __restrict__ oidx, const __half* __restrict__ oval, int n_out,
    __half* __restrict__ w, int rows, int in_f, int gs, int k4)
{
    // One thread per weight: simple, and only used ahead of a cuBLAS GEMM.
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= (long long)rows * in_f) return;
    const int row = (int)(i / in_f), col = (int)(i - (long long)row * in_f);
    const int G = in_f / gs, GB = (G + 7) >> 3;
    const int* r2 = q2 + (long long)row * ((G - k4) * gs / 16);
    const int* r4 = q4 + (long long)row * (k4 * gs / 8);
    const unsigned char* gm = gmap + (long long)row * GB;
    const int g = col / gs;
    const float S = __half2float(sup[2 * row]), L = __half2float(sup[2 * row + 1]);
    const float s = fmaxf((float)scale[(long long)row * G + g] * S, 1e-12f);
    const float lo = (float)zero[(long long)row * G + g] * L;
    w[i] = __float2half(code_at(r2, r4, gm, col, gs) * s + lo);
}

extern "C" __global__ void scatter_outliers(
    const int* __restrict__ oidx, const __half* __restrict__ oval, int n_out,
    __half* __restrict__ w, int rows, int in_f)
{
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= (long long)rows * n_out) return;
    const int row = (int)(i / n_out);
    w[(long long)row * in_f + oidx[i]] = oval[i];
}
"""


@functools.cache
def available() -> bool:
    """cupy imports and sees a CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or a CUDA runtime error without a driver
        return False


def _cp() -> Any:
    import cupy

    return cupy


@functools.cache
def _module(device: int) -> Any:
    cp = _cp()
    with cp.cuda.Device(device):
        return cp.RawModule(code=_SOURCE, options=("--std=c++14",))


def _arr(t: torch.Tensor) -> Any:
    """A CuPy view of a CUDA tensor (DLPack, no copy)."""
    return _cp().from_dlpack(t.contiguous())


def _launch(name: str, device: torch.device, blocks: int, threads: int, args: tuple) -> None:
    cp = _cp()
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(device)
    with cp.cuda.Device(index), cp.cuda.ExternalStream(stream.cuda_stream, index):
        _module(index).get_function(name)((blocks,), (threads,), args)


@functools.cache
def _placeholders(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Allocated once per device rather than on every GEMV call.
    return (
        torch.zeros(1, dtype=torch.int32, device=device),
        torch.zeros(1, dtype=torch.float16, device=device),
    )


def _packed_args(packed: Any, device: torch.device) -> tuple[list[Any], int]:
    parts = [
        packed.q2.to(device),
        packed.q4.to(device),
        packed.gmap.to(device),
        packed.scale.to(device),
        packed.zero.to(device),
        packed.super.to(device),
    ]
    n_out = packed.outliers
    if n_out:
        oidx, oval = packed.oidx.to(device, torch.int32), packed.oval.to(device)
    else:  # never read with n_out = 0; the kernel still needs valid pointers
        oidx, oval = _placeholders(device)
    return [_arr(p) for p in (*parts, oidx, oval)], n_out


def dequantize(packed: Any, device: torch.device) -> torch.Tensor:
    """The fp16 [out, in] matrix of a Packed, on `device`."""
    import numpy as np

    rows, in_f = packed.shape
    args, n_out = _packed_args(packed, device)
    w = torch.empty(rows, in_f, dtype=torch.float16, device=device)
    total = rows * in_f
    scalars = (np.int32(rows), np.int32(in_f), np.int32(packed.group_size), np.int32(packed.k4))
    _launch(
        "dequant_w24",
        device,
        (total + 255) // 256,
        256,
        (*args[:6], args[6], args[7], np.int32(n_out), _arr(w), *scalars),
    )
    if n_out:
        _launch(
            "scatter_outliers",
            device,
            (rows * n_out + 255) // 256,
            256,
            (args[6], args[7], np.int32(n_out), _arr(w), np.int32(rows), np.int32(in_f)),
        )
    return w


def quant_matmul(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """x [..., in] @ Ŵᵀ for a Packed Ŵ; fp32 accumulation, result in x's dtype."""
    import numpy as np

    rows, in_f = packed.shape
    flat = x.reshape(-1, in_f)
    if flat.shape[0] != 1:
        w = dequantize(packed, x.device)
        return (flat.to(torch.float16) @ w.T).to(x.dtype).reshape(*x.shape[:-1], rows)
    args, n_out = _packed_args(packed, x.device)
    xv = flat[0].to(torch.float32).contiguous()
    y = torch.empty(rows, dtype=torch.float32, device=x.device)
    threads = 256  # 8 rows per block
    _launch(
        "gemv_w24",
        x.device,
        (rows * 32 + threads - 1) // threads,
        threads,
        (
            *args[:6],
            args[6],
            args[7],
            np.int32(n_out),
            _arr(xv),
            _arr(y),
            np.int32(rows),
            np.int32(in_f),
            np.int32(packed.group_size),
            np.int32(packed.k4),
        ),
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)
