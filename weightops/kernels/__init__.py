"""Backend-neutral linear algebra for the heavy work of merging and quantization.

Every function takes and returns torch tensors. The torch implementation here is the
reference and runs on any device; `backend(tensor)` says which implementation serves a
tensor (`WEIGHTOPS_BACKEND=torch|cupy` overrides the choice). Method code calls these
functions and never imports cupy.

- `svd`: batched thin SVD, exact.
- `truncated_svd`: the top-k singular triplets of a batch, randomized (Halko, Martinsson
  and Tropp 2011, with power iterations); exact (via `svd`) when k is not much smaller
  than the matrix.
- `polar`: the orthogonal polar factor (nearest matrix with orthonormal columns).
- `matmul`: a product in the precision the caller asks for.
- `linear_assignment`: the permutation maximizing (or minimizing) a total score.
- `quant_matmul`: x @ Ŵᵀ for a packed mixed 2/4-bit matrix Ŵ (weightops.quant.mixed);
  on CUDA with cupy a fused dequantize + GEMV kernel (cupy_backend).
"""

from __future__ import annotations

import os
from typing import Any

import torch

BACKENDS = ("torch", "cupy")
# polar() uses the Gram form while λ_min/λ_max of xᵀx (that is 1/κ(x)²) is above this.
POLAR_GRAM_MIN_RATIO = 1e-8


def backend(t: torch.Tensor) -> str:
    """The implementation that serves `t`: CuPy for CUDA tensors when cupy is installed
    and sees the device, torch otherwise. `WEIGHTOPS_BACKEND=torch` forces the
    reference; `=cupy` makes a missing cupy an error instead of a silent fallback.
    CPU tensors are always served by torch.
    """
    chosen = os.environ.get("WEIGHTOPS_BACKEND", "").strip().lower()
    if chosen and chosen not in BACKENDS:
        raise ValueError(f"WEIGHTOPS_BACKEND={chosen!r}: use one of {', '.join(BACKENDS)}")
    if t.device.type != "cuda" or chosen == "torch":
        return "torch"
    from weightops.kernels import cupy_backend

    if cupy_backend.available():
        return "cupy"
    if chosen == "cupy":
        raise RuntimeError(
            "WEIGHTOPS_BACKEND=cupy but cupy cannot be used here: "
            "pip install 'weightops[gpu]' on a machine with a CUDA device"
        )
    return "torch"


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # LAPACK / cuSOLVER have no 16-bit paths; float64 stays float64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a matrix or a batch (..., m, n): U (..., m, r), S (..., r), Vh (..., r, n),
    r = min(m, n), singular values in descending order."""
    return torch.linalg.svd(x.to(_work_dtype(x)), full_matrices=False)


def truncated_svd(
    x: torch.Tensor,
    k: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `k` singular triplets of a matrix or batch (..., m, n), randomized.

    A Gaussian sketch of k + oversample columns, `power_iters` rounds of (X Xᵀ)
    re-orthonormalized by QR, then the exact SVD of the small projected matrix.
    Error it allows (Halko et al. 2011, Cor. 10.10): the rank-k reconstruction's
    spectral error is within a factor (1 + 9·√(k+p)·√min(m,n))^(1/(2q+1)) of the best
    possible, σₖ₊₁, in expectation; with q = 2 that factor is below 3 for any matrix
    here, and the leading triplets are far more accurate than the tail ones (error in
    σᵢ shrinks like (σₖ₊₁/σᵢ)^(2q+1)). When k + oversample reaches half of min(m, n)
    the sketch saves nothing, so the exact SVD is used instead.
    """
    m, n = x.shape[-2:]
    r = min(m, n)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(k, r)
    if 2 * (k + oversample) >= r:
        u, s, vh = svd(x)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    a = x.to(_work_dtype(x))
    transposed = m < n
    if transposed:  # sketch the longer side so Q is the thin factor
        a = a.mT
    omega = torch.randn(
        (*a.shape[:-2], a.shape[-1], k + oversample),
        dtype=a.dtype,
        device="cpu" if generator is None else generator.device,
        generator=generator,
    ).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.mT @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    u = q @ ub[..., :k]
    s, vh = s[..., :k], vh[..., :k, :]
    if transposed:
        return vh.mT, s, u.mT
    return u, s, vh


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of (..., m, n): P Qᵀ where x = P Σ Qᵀ. It is the matrix
    with orthonormal columns (or rows) nearest to x in Frobenius norm.

    Computed as x (xᵀx)^(−1/2) from the eigendecomposition of the small Gram matrix
    (min(m, n) square, formed and decomposed in float64), which is the same matrix
    whenever x has full rank and costs a fraction of an SVD of a tall x. Its error
    grows like ε₆₄·κ(x)², so above κ(x) = 10⁴ (and for rank-deficient x, whose polar
    factor is not unique) the SVD form is used instead.
    """
    a = x.to(_work_dtype(x))
    wide = a.shape[-2] < a.shape[-1]
    if wide:  # the Gram matrix of the shorter side is the small one
        a = a.mT
    a64 = a.double()
    lam, q = torch.linalg.eigh(a64.mT @ a64)
    del a64
    if bool((lam[..., 0] > lam[..., -1] * POLAR_GRAM_MIN_RATIO).all()):
        inv_sqrt = (q * lam.rsqrt().unsqueeze(-2)) @ q.mT
        p = a @ inv_sqrt.to(a.dtype)
    else:
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        p = u @ vh
    return p.mT if wide else p


def matmul(a: torch.Tensor, b: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """a @ b computed in `dtype` (default: float32 for 16-bit inputs, else the inputs' type)."""
    if dtype is None:
        dtype = torch.promote_types(a.dtype, b.dtype)
        if dtype in (torch.float16, torch.bfloat16) and a.device.type == "cpu":
            dtype = torch.float32
    return a.to(dtype) @ b.to(dtype)


def linear_assignment(score: torch.Tensor, *, maximize: bool = True) -> torch.Tensor:
    """The permutation p (a LongTensor of length n) that maximizes (or minimizes)
    Σᵢ score[i, p[i]] for a square score matrix, solved exactly (Jonker-Volgenant)."""
    from scipy.optimize import linear_sum_assignment

    if score.dim() != 2 or score.shape[0] != score.shape[1]:
        raise ValueError(f"linear_assignment needs a square matrix, got {list(score.shape)}")
    rows, cols = linear_sum_assignment(
        score.detach().to("cpu", torch.float64).numpy(), maximize=maximize
    )
    perm = torch.empty(score.shape[0], dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm.to(score.device)


def quant_matmul(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """x [..., in] @ Ŵᵀ for a packed mixed 2/4-bit matrix (a weightops.quant.mixed.Packed),
    without keeping the dequantized matrix; the result has x's dtype."""
    if backend(x) == "cupy":
        from weightops.kernels import cupy_backend

        return cupy_backend.quant_matmul(x, packed)
    from weightops.quant.mixed import dequantize

    w = dequantize(packed).to(device=x.device, dtype=x.dtype)
    return x @ w.T
