"""Task Singular Vectors: TSV-M and its outlier- and rank-aware variant R-TSVM.

Both work matrix by matrix: each task's update Δᵢ = θᵢ − θ_base is cut to its leading
singular triplets, the triplets of all tasks are placed side by side, and the two
stacks of singular vectors are replaced by the nearest orthonormal ones (their polar
factors) before the update is rebuilt. Tasks whose leading directions overlap are
thereby pushed apart instead of being added on top of each other.
"""

from __future__ import annotations

import typing
from typing import Annotated, Literal

import torch

from weightops import kernels
from weightops.merge.registry import NonNegative, PerModel, Range, merge_method
from weightops.merge.sparsify import kth_largest, task_vectors

SvdMode = Literal["auto", "full", "truncated"]
SVD_MODES = typing.get_args(SvdMode)
# With svd="auto", matrices at least this large use the randomized truncated SVD: below
# it an exact SVD costs milliseconds and the approximation would buy nothing.
AUTO_TRUNCATE_ENTRIES = 1 << 18
# Stacking the task matrices into one batched call saves per-call overhead (and lets a
# GPU work on all of them at once) but costs one extra copy of every delta; above this
# many entries in total the deltas are decomposed one at a time instead.
BATCH_ENTRIES = 1 << 22
# σ of a standard normal from the median absolute value of zero-centred samples.
MAD_TO_SIGMA = 1.4826
# The randomized SVD is seeded from this constant, so a merge depends only on its inputs.
SKETCH_SEED = 0

Fraction = Annotated[float, Range(ge=0, le=1)]


@merge_method("tsv_m", base="required", reference="https://arxiv.org/abs/2412.00081")
def tsv_m(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float] = 1.0,
    lambda_: float = 1.0,
    svd: SvdMode = "full",
) -> torch.Tensor:
    """TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
    Model Merging", CVPR 2025).

    For every 2-D weight of shape m × n, with T fine-tunes and r = min(m, n):
      Δᵢ = θᵢ − θ_base = Uᵢ Sᵢ Vᵢᵀ                       (thin SVD)
      keep the top k = ⌊r/T⌋ triplets of each task and place them side by side:
      Û = [U₁,ₖ … U_T,ₖ] (m × Tk), Ŝ = diag(w₁S₁,ₖ … w_T S_T,ₖ), V̂ = [V₁,ₖ … V_T,ₖ]
      U⊥ = polar(Û) = PQᵀ where Û = PΣQᵀ (equivalently Û(ÛᵀÛ)^(−1/2)); V⊥ likewise
      θ = θ_base + λ · U⊥ Ŝ V⊥ᵀ
    The r − Tk slots left over when T does not divide r carry nothing, so they are
    left out (the polar factor of the remaining columns is the same); so are triplets
    whose singular value is zero to working precision (σ ≤ max(m, n)·ε·σ₁ of their
    task): their singular vectors are arbitrary and would only pull the other tasks'
    directions around in the polar step. Tasks whose kept subspaces are mutually
    orthogonal therefore merge to the sum of their rank-k truncations, and identical
    models to the base.

    Every other tensor — 1-D (norms, biases), 3-D and up (stacked experts, convolutions),
    and matrices with fewer than T rows or columns (k would be 0) — gets the mean task
    vector, as in the paper: θ = θ_base + λ · Σᵢ wᵢΔᵢ / T.
    Embeddings and lm_head are 2-D weights and are merged like any other matrix (a
    vocabulary matrix is a linear map from one-hot tokens, and the paper applies the
    SVD to every matrix). They are the costliest matrices by far (each SVD of a
    32000 × 768 matrix takes seconds); a recipe can give them alone the truncated SVD
    with a filter, e.g. svd: [{filter: embed_tokens, value: truncated}, {value: full}].

    Parameters:
      weight (per model, default 1.0): scales each task's singular values (wᵢSᵢ);
        the paper has no weights (all 1). Typical range 0 … 1.5; negative subtracts.
      lambda (default 1.0): scale of the merged update. TSV-M keeps each task's own
        singular values, so 1.0 is the natural choice; the paper sweeps 0.1 … 3.0 on
        validation data and usually lands near 1.
      svd (default "full"): how each task's top-k triplets are found.
        "full": exact thin SVD, the paper's method. "truncated": randomized SVD
        (Halko, Martinsson and Tropp 2011; k + 8 sketch columns, 2 power iterations, a
        fixed seed, so the result is deterministic), much cheaper when k ≪ r (many
        tasks, large models). "auto": truncated for matrices of at least 2¹⁸ entries,
        exact below. Exact is the default because the truncated result is only as
        good as the task updates are low-rank (see the error below). The randomized SVD itself switches to the exact one when
        k + 8 reaches r/2 (T ≤ 2 for square matrices), where sketching saves nothing.
    Error the truncated path allows: it is exact TSV-M applied to randomized rank-k
    approximations Aᵢ = kernels.truncated_svd(Δᵢ, k) (one call per task, generator
    seeded with 0) in place of the best rank-k parts Δᵢ,ₖ, with
    ‖Aᵢ − Δᵢ‖₂ ≤ 3·σₖ₊₁(Δᵢ), hence ‖Aᵢ − Δᵢ,ₖ‖₂ ≤ 4·σₖ₊₁(Δᵢ) (the kernel's bound,
    in expectation). Where the tasks' kept subspaces are mutually orthogonal the merged
    update is Σᵢ wᵢAᵢ, so it moves by at most 4·Σᵢ |wᵢ|·σₖ₊₁(Δᵢ) in spectral norm. Where
    they overlap, the polar step can amplify the difference (up to about 1/σ_min of Û
    and V̂), and singular vectors of clustered singular values may rotate among
    themselves; on a decaying spectrum the leading triplets are accurate to
    O((σₖ₊₁/σⱼ)⁵). On flat spectra (task vectors without low-rank structure) the
    randomized parts span other directions than the exact ones and the two merges
    can differ by a large share of the update (BENCHMARKS.md: about 60% on synthetic
    noise updates); use svd="full" where the exact result matters.
    """
    return _merge(tensors, base, weight, lambda_, svd, outlier_z=0.0, outlier_slope=1.0, energy=0.0)


@merge_method("r_tsvm", base="required", reference="https://arxiv.org/abs/2502.06876")
def r_tsvm(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float] = 1.0,
    lambda_: float = 1.0,
    svd: SvdMode = "full",
    outlier_z: NonNegative = 3.0,
    outlier_slope: Fraction = 0.0,
    energy: Fraction = 0.9,
) -> torch.Tensor:
    """R-TSVM: TSV-M with outlier-aware reweighting and energy-based per-task ranks
    (after Yang et al., "Mix Data or Merge Models? Balancing the Helpfulness, Honesty,
    and Harmlessness of Large Language Model via Model Merging", 2025, where the method
    is also called RESM). The paper's exact formulas are not public; the two parts
    below are this package's design, chosen to match its description (heavy-tailed
    LLM task vectors; layers differ in how sparse / low-rank their updates are).

    1. Outlier damping, every tensor, each task on its own, before anything else:
         s = 1.4826 · median{|Δᵢ,ⱼ| : Δᵢ,ⱼ ≠ 0}      (robust σ; exact zeros, common in
                                                     bf16 task vectors, are left out)
         τ = outlier_z · s
         |Δᵢ,ⱼ| > τ  →  sign(Δᵢ,ⱼ) · (τ + outlier_slope · (|Δᵢ,ⱼ| − τ))
       Entries within τ are untouched. The median is the upper one for even counts.
       A few huge entries would otherwise take leading singular directions of their
       own (a spike aᵢbⱼᵀ is a rank-1 matrix) and crowd out the task's structured,
       low-rank part; Model Breadcrumbs made the same observation for elementwise
       merges and drops them outright, here they are clipped softly.
    2. Rank selection, 2-D weights: instead of k = ⌊r/T⌋ for every task, each task
       takes the fewest leading triplets that hold an `energy` share of its squared
       Frobenius norm, kᵢ = min{k : Σ_{l≤k} σᵢ,ₗ² ≥ energy·‖Δᵢ‖²_F}, capped at
       K = min(r, 2⌊r/T⌋). When Σ kᵢ exceeds the budget r, every task with a non-zero
       update keeps its first triplet and the remaining slots go to the triplets with
       the largest share of their own task's energy, σᵢ,ₗ²/‖Δᵢ‖²_F (ties: earlier
       index, then earlier task). Low-rank (sparse) task updates thus use few slots,
       leaving room for high-rank ones, and the near-noise tail is not merged at all.
       The merge is then TSV-M's with these ranks.
    Non-2-D tensors get the mean of the damped task vectors, as in TSV-M.

    Parameters:
      weight, lambda, svd: as tsv_m. With svd="truncated" (or "auto" on large
        matrices) the top K triplets are sketched, K as above.
      outlier_z (default 3.0, ≥ 0): damping threshold in robust standard deviations;
        0 switches damping off. 3 … 6 touches well under 1% of a Gaussian-like update
        and the heavy tail of an LLM one.
      outlier_slope (default 0.0, 0 … 1): share of the excess beyond τ that is kept;
        0 clips to τ, 1 switches damping off.
      energy (default 0.9, 0 … 1): share of each task's energy its rank must hold;
        0 switches rank selection off (k = ⌊r/T⌋ as in TSV-M); 1 fills the whole
        budget r, only redistributed between tasks by relative energy. 0.8 … 0.99 is
        the useful range.
    With outlier_z = 0 and energy = 0 the result is exactly tsv_m's.
    """
    return _merge(tensors, base, weight, lambda_, svd, outlier_z, outlier_slope, energy)


# ----------------------------------------------------------------------------- shared


def _merge(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weights: list[float],
    lam: float,
    svd: str,
    outlier_z: float,
    outlier_slope: float,
    energy: float,
) -> torch.Tensor:
    if svd not in SVD_MODES:
        raise ValueError(f"svd must be one of {', '.join(SVD_MODES)}, got {svd!r}")
    n_tasks = len(tensors)
    if base.numel() == 0:
        return base
    deltas = task_vectors(tensors, base)
    if outlier_z > 0 and outlier_slope < 1:
        for d in deltas:
            damp_outliers(d, outlier_z, outlier_slope)
    if base.dim() != 2 or min(base.shape) < n_tasks:
        mixed = torch.zeros_like(base)
        for d, w in zip(deltas, weights, strict=True):
            mixed.add_(d, alpha=w)
        return base.add_(mixed, alpha=lam / n_tasks)
    update = _tsv_update(deltas, weights, svd, energy)
    return base.add_(update, alpha=lam)


def damp_outliers(delta: torch.Tensor, z: float, slope: float) -> torch.Tensor:
    """Shrink, in place, the part of each entry beyond τ = z · 1.4826 · median of the
    non-zero |entries| to `slope` times itself (see r_tsvm)."""
    mag = delta.abs().reshape(-1)
    nonzero = mag[mag > 0]
    if nonzero.numel() == 0:
        return delta
    median, _, _ = kth_largest(nonzero, (nonzero.numel() + 1) // 2)
    del nonzero
    tau = z * MAD_TO_SIGMA * float(median)
    # excess = max(|δ| − τ, 0); δ ← δ − sign(δ)·(1 − slope)·excess
    excess = mag.sub_(tau).clamp_(min=0)
    flat = delta.view(-1)
    flat.sub_(excess.copysign_(flat).mul_(1 - slope))
    return delta


def _tsv_update(
    deltas: list[torch.Tensor], weights: list[float], svd: str, energy: float
) -> torch.Tensor:
    """U⊥ Ŝ V⊥ᵀ for one matrix (see tsv_m), with per-task ranks from `energy` when > 0."""
    n_tasks = len(deltas)
    m, n = deltas[0].shape
    r = min(m, n)
    share = r // n_tasks
    depth = min(r, 2 * share) if energy > 0 else share
    truncated = svd == "truncated" or (svd == "auto" and m * n >= AUTO_TRUNCATE_ENTRIES)
    u, s, vh = _top_triplets(deltas, depth, truncated)
    if energy > 0:
        totals = [float(torch.linalg.vector_norm(d)) ** 2 for d in deltas]
        ranks = energy_ranks(s, totals, energy, budget=r)
    else:
        ranks = [share] * n_tasks
    del deltas
    # Triplets whose singular value is zero to working precision carry nothing, and
    # their singular vectors are an arbitrary completion: left in, the polar step would
    # rotate the other tasks' directions towards them.
    eps = torch.finfo(s.dtype).eps * max(m, n)
    ranks = [min(k, int((row > eps * row[0]).sum())) for k, row in zip(ranks, s, strict=True)]
    u_hat = torch.cat([u[i, :, :k] for i, k in enumerate(ranks)], dim=1)
    v_hat = torch.cat([vh[i, :k, :] for i, k in enumerate(ranks)], dim=0)
    s_hat = torch.cat([s[i, :k] * w for i, (k, w) in enumerate(zip(ranks, weights, strict=True))])
    del u, vh
    if s_hat.numel() == 0:
        return torch.zeros((m, n), dtype=s.dtype, device=s.device)
    u_orth = kernels.polar(u_hat)
    del u_hat
    vh_orth = kernels.polar(v_hat)  # p × n with orthonormal rows: V⊥ᵀ
    del v_hat
    return kernels.matmul(u_orth.mul_(s_hat), vh_orth)


def _top_triplets(
    deltas: list[torch.Tensor], k: int, truncated: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets of every delta, stacked: (T, m, k), (T, k), (T, k, n)."""

    def decompose(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if truncated:
            g = torch.Generator(device=x.device).manual_seed(SKETCH_SEED)
            return kernels.truncated_svd(x, k, generator=g)
        if x.shape[-2] < x.shape[-1]:
            # LAPACK takes about half the time on the tall orientation of the same
            # matrix; xᵀ = U′SV′ᵀ gives x = V′SU′ᵀ.
            u_t, s, vh_t = kernels.svd(x.mT)
            return vh_t.mT[..., :k], s[..., :k], u_t.mT[..., :k, :]
        u, s, vh = kernels.svd(x)
        return u[..., :k], s[..., :k], vh[..., :k, :]

    # The sketch is drawn per task (not per batch), so a task's triplets do not depend
    # on how many other tasks there are or on whether they were batched.
    if not truncated and len(deltas) * deltas[0].numel() <= BATCH_ENTRIES:
        return decompose(torch.stack(deltas))
    parts = [decompose(d) for d in deltas]
    return tuple(torch.stack([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]


def energy_ranks(s: torch.Tensor, totals: list[float], energy: float, budget: int) -> list[int]:
    """Per-task ranks from the leading singular values s (T, K) and each task's squared
    Frobenius norm: the fewest triplets holding `energy` of it, fitted into `budget`
    slots by relative energy (see r_tsvm)."""
    n_tasks, depth = s.shape
    rel = [
        (s[i].double().square() / totals[i]).tolist() if totals[i] > 0 else [0.0] * depth
        for i in range(n_tasks)
    ]
    ranks = []
    for i in range(n_tasks):
        if totals[i] <= 0:
            ranks.append(0)
            continue
        held, k = 0.0, 0
        # A relative 1e-9 slack keeps rounding in the running sum from asking for one
        # more triplet than an exactly rank-k update has.
        while k < depth and held < energy * (1 - 1e-9):
            held += rel[i][k]
            k += 1
        ranks.append(max(k, 1))
    if sum(ranks) <= budget:
        return ranks
    chosen = [min(1, k) for k in ranks]
    rest = sorted(
        ((-rel[i][j], j, i) for i in range(n_tasks) for j in range(1, ranks[i])),
    )
    for _, _, i in rest[: budget - sum(chosen)]:
        chosen[i] += 1
    return chosen
