"""Karcher mean: the Riemannian centre of the models' directions on the unit sphere."""

from __future__ import annotations

import math
from typing import Annotated

import torch

from weightops.merge.registry import Range, merge_method, numerics_variant
from weightops.merge.slerp import EPS


@merge_method("karcher", min_models=1, reference="https://arxiv.org/abs/2603.04972")
def karcher(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    max_iter: Annotated[int, Range(ge=0)] = 10,
    tol: Annotated[float, Range(ge=0)] = 1e-5,
) -> torch.Tensor:
    """Karcher (Fréchet) mean on the hypersphere (Karcher 1977; used for LLM merging in
    "Functionality-Oriented LLM Merging on the Fisher-Rao Manifold", 2026; mergekit's
    `karcher`).

    Each of the N flattened inputs is split into its norm nᵢ and direction uᵢ. Inputs
    with nᵢ ≤ tol have no direction and are left out of the mean (weights 1/K over the
    K others). Starting from the normalised mean direction u = Σuᵢ/‖Σuᵢ‖ (or the first
    direction when the mean (1/K)Σuᵢ is shorter than tol), repeat at most max_iter
    times:
      θᵢ = arccos(u·uᵢ)
      T = (1/K) Σᵢ θᵢ/sin θᵢ · (uᵢ − (u·uᵢ)u)     (the mean of the log maps; θᵢ < tol skipped)
      stop if ‖T‖ < tol, else u ← cos‖T‖·u + sin‖T‖·T/‖T‖ (renormalised)
    and return θ = (1/N Σᵢ nᵢ) · u: the Riemannian mean direction with the mean norm
    of all N inputs. For two inputs the first guess is already the geodesic midpoint.
    An input exactly opposite u (sin θᵢ < 1e-8) has no defined log map and is skipped
    in that step; all-zero inputs give zeros.

    Parameters:
      max_iter (default 10, ≥ 0): iterations of the fixed-point update; 0 returns the
        normalised mean direction. Checkpoints close together converge in a few.
      tol (default 1e-5, ≥ 0): the norm below which an input has no direction, the
        angle below which an input already sits at u, and the step size that ends
        the iteration.
    No weights (every model counts equally, as in mergekit) and no base_model: list
    every model to average under `models`. `--numerics mergekit` follows mergekit in
    the inputs' dtype, where an exactly opposite input is not skipped.
    """
    n = len(tensors)
    norms = [torch.linalg.vector_norm(x).item() for x in tensors]
    units = [x.div_(nx) for x, nx in zip(tensors, norms, strict=True) if nx > tol]
    if not units:
        return tensors[0].zero_()
    a = 1 / len(units)
    u = torch.zeros_like(units[0])
    for ui in units:
        u.add_(ui, alpha=a)
    nu = torch.linalg.vector_norm(u).item()
    if nu < tol:
        u.copy_(units[0])
    else:
        u.div_(nu)
    step = torch.empty_like(u)
    for _ in range(max_iter):
        step.zero_()
        for ui in units:
            c = min(1.0, max(-1.0, torch.dot(u.reshape(-1), ui.reshape(-1)).item()))
            theta = math.acos(c)
            if theta < tol or math.sin(theta) < EPS:
                continue
            k = a * theta / math.sin(theta)
            step.add_(ui, alpha=k).add_(u, alpha=-k * c)
        norm_step = torch.linalg.vector_norm(step).item()
        if norm_step < tol:
            break
        u.mul_(math.cos(norm_step)).add_(step, alpha=math.sin(norm_step) / norm_step)
        nu = torch.linalg.vector_norm(u).item()
        if nu > tol:
            u.div_(nu)
    return u.mul_(sum(norms) / n)


@numerics_variant("karcher", "mergekit")
def karcher_as_mergekit(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """The Karcher mean as mergekit computes it: norms in fp32, every direction, step
    and iterate rounded to the inputs' dtype, weights 1/N."""
    if len(tensors) == 1:
        return tensors[0]
    alpha = 1.0 / len(tensors)
    norms: list[float] = []
    units: list[torch.Tensor] = []
    for x in tensors:
        nx = torch.linalg.norm(x.float())
        norms.append(nx.item())
        units.append(torch.zeros_like(x) if norms[-1] == 0.0 else (x / nx).to(x.dtype))
    valid = [ui for ui, nx in zip(units, norms, strict=True) if nx > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a = alpha / sum([alpha] * len(valid))
    u = torch.zeros_like(valid[0])
    for ui in valid:
        u += a * ui
    nu = torch.linalg.norm(u.float()).item()
    u = valid[0].clone() if nu < tol else (u / nu).to(u.dtype)
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for ui in valid:
            c = torch.clamp(torch.dot(u.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(c)
            if theta.item() < tol:
                continue
            step += a * (theta / torch.sin(theta)) * (ui - c * u)
        norm_step = torch.linalg.norm(step.float())
        if norm_step.item() < tol:
            break
        u = (torch.cos(norm_step) * u + torch.sin(norm_step) * (step / norm_step)).to(u.dtype)
        nu_t = torch.linalg.norm(u.float())
        if nu_t.item() > tol:
            u = (u / nu_t).to(u.dtype)
    scale = 0.0
    for nx in norms:
        scale += alpha * nx
    return scale * u
