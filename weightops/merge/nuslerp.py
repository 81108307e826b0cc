"""NuSLERP: spherical interpolation of two models, or of their task vectors around a base."""

from __future__ import annotations

import torch

from weightops.merge.registry import PerModel, merge_method, numerics_variant
from weightops.merge.slerp import DOT_THRESHOLD, EPS

# Weights summing to less than this in magnitude cannot set t; the midpoint is used.
_ZERO_SUM = 1e-6


@merge_method(
    "nuslerp",
    base="optional",
    min_models=2,
    max_models=2,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp",
)
def nuslerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    """SLERP of two models set by relative weights, optionally of their task vectors
    (mergekit's NuSLERP; Shoemake 1985 for SLERP itself).

      t = w₂ / (w₁ + w₂)   (t = ½ when |w₁ + w₂| < 1e-6)
      slerp(a, b) = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,  Ω = ∠(a, b)
      θ = slerp(θ₁, θ₂)                                 without base_model
      θ = θ_base + slerp(θ₁ − θ_base, θ₂ − θ_base)      with base_model
    Vectors whose directions are nearly parallel or antiparallel (|cos Ω| > 0.9995)
    are interpolated linearly, as `slerp` does; a zero vector counts as orthogonal to
    everything (Ω = π/2), so it never produces NaN.

    Parameters:
      weight (per model, required): relative weight of each of the two models; only
        their ratio matters. Weights of one sign keep 0 ≤ t ≤ 1; [1, 0] gives the
        first model, [0, 1] the second, mixed signs extrapolate beyond them.
      nuslerp_flatten (default true): treat the whole tensor as one vector. When
        false, each vector along one dimension is interpolated on its own.
      nuslerp_row_wise (default false): with nuslerp_flatten false, false interpolates
        the vectors along the last dimension (the rows of a matrix), true those along
        the first dimension (its columns). These are mergekit's semantics, whatever
        the option's name suggests. 0- and 1-D tensors are always one vector.
    Exactly two models besides the optional base_model.
    Deliberate difference from mergekit: mergekit falls back to linear interpolation
    only where sin Ω < 1e-8; here below the 0.9995 cosine threshold as in `slerp`,
    which changes the result by at most ~1e-4 relative for nearly parallel vectors and
    avoids mergekit's division by sin(π) ≈ −9e-8 for exactly antiparallel ones.
    `--numerics mergekit` keeps mergekit's threshold.
    """
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < _ZERO_SUM else weight[1] / total
    a, b = (x.contiguous() for x in tensors)
    if base is not None:
        a.sub_(base)
        b.sub_(base)
    if nuslerp_flatten or a.dim() < 2:
        va, vb = a.view(1, -1), b.view(1, -1)
    elif nuslerp_row_wise:
        va, vb = a.transpose(0, -1), b.transpose(0, -1)
    else:
        va, vb = a, b
    slerp_vectors_(va, vb, t)
    return a if base is None else a.add_(base)


def slerp_vectors_(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of every vector along the last dimension of `a` with the matching one in
    `b`, written into `a` (`b` is overwritten too). Linear where the pair is nearly
    (anti)parallel; t = 0 and t = 1 return `a` and `b` exactly."""
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    na = torch.where(na > EPS, na, 1)
    nb = torch.where(nb > EPS, nb, 1)
    cos = (torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1) / (na * nb)).clamp(-1, 1)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    linear = cos.abs() > DOT_THRESHOLD
    # sin Ω may be 0 in the linear rows; torch.where keeps their NaN out of the result.
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / so)
    cb = torch.where(linear, t, torch.sin(t * omega) / so)
    return a.mul_(ca).add_(b.mul_(cb))


@numerics_variant("nuslerp", "mergekit")
def nuslerp_as_mergekit(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    """NuSLERP in mergekit's dtype and order: norms floored at 1e-7, and linear
    interpolation only where |sin Ω| < 1e-8."""
    total = sum(weight)
    t = 0.5 if abs(total) < _ZERO_SUM else weight[1] / total
    a, b = tensors
    dim = 0 if nuslerp_row_wise else -1
    if base is None:
        return _slerp_mergekit(t, a, b, dim, nuslerp_flatten)
    return base + _slerp_mergekit(t, a - base, b - base, dim, nuslerp_flatten)


def _slerp_mergekit(
    t: float, a: torch.Tensor, b: torch.Tensor, dim: int, flatten: bool
) -> torch.Tensor:
    shape = a.shape
    if flatten:
        a, b = a.view(-1), b.view(-1)
    elif dim != -1:
        a, b = a.transpose(dim, -1), b.transpose(dim, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(a) * unit(b), dim=-1, keepdim=True)
    omega = torch.acos(cos.clamp(-1, 1))
    so = torch.sin(omega)
    colinear = (so.abs() < EPS).squeeze()
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so
    out[colinear] = (1 - t) * a[colinear] + t * b[colinear]
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.view(shape)
