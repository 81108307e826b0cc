"""SLERP: spherical linear interpolation between two models."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch

from weightops.merge.registry import Range, merge_method, numerics_variant

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@merge_method(
    "slerp",
    base="required",
    min_models=1,
    max_models=1,
    reference="https://en.wikipedia.org/wiki/Slerp",
)
def slerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    t: Annotated[float, Range(ge=0, le=1)],
) -> torch.Tensor:
    """Spherical interpolation from the base (t = 0) to the other model (t = 1)
    (Shoemake 1985; the usual way to blend two LLM checkpoints).

    Each tensor is flattened; with Ω the angle between the two normalised tensors,
      θ = sin((1−t)Ω)/sin Ω · θ_base + sin(tΩ)/sin Ω · θ_other,
    and plain linear interpolation when |cos Ω| > 0.9995 (nearly parallel or
    antiparallel, where the formula is ill-conditioned).

    Parameters:
      t (required, 0 ≤ t ≤ 1): position on the arc; usually a gradient over depth,
        e.g. [0, 0.5, 1], with filters for self_attn / mlp. As in mergekit, tensors
        outside decoder blocks (embeddings, final norm, lm_head) see the first
        gradient value.
    Exactly one model besides base_model.
    """
    a = base.reshape(-1)
    b = tensors[0].reshape(-1)
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = na if na > EPS else torch.ones_like(na)
    nb = nb if nb > EPS else torch.ones_like(nb)
    dot = torch.dot(a / na, b / nb).clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        return base.lerp_(tensors[0], t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    ca = (torch.sin((1 - t) * omega) / so).item()
    cb = (torch.sin(t * omega) / so).item()
    return base.mul_(ca).add_(tensors[0], alpha=cb)


@numerics_variant("slerp", "mergekit")
def slerp_as_mergekit(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    t: float,
) -> torch.Tensor:
    """mergekit's slerp: numpy float32 on the CPU (its norms, pairwise sum and
    trigonometry, every scalar kept in float32), rounded back to the inputs' dtype."""
    a = base.detach().cpu().float().numpy()
    b = tensors[0].detach().cpu().float().numpy()
    t32 = np.float32(t)

    def unit(v: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(v)
        return v / norm if norm > EPS else v

    dot = np.sum(unit(a) * unit(b))
    if np.abs(dot) > DOT_THRESHOLD:
        out = (np.float32(1) - t32) * a + t32 * b
    else:
        omega = np.arccos(dot)
        so = np.sin(omega)
        omega_t = omega * t32
        out = (np.sin(omega - omega_t) / so) * a + (np.sin(omega_t) / so) * b
    return torch.from_numpy(np.ascontiguousarray(out)).to(base.dtype).to(base.device)
