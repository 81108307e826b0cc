"""mergekit's order of operations for the task-vector family, for `--numerics mergekit`.

The methods' own modules register variants (see `numerics_variant` in the registry)
built from these pieces. Everything runs in the inputs' dtype (the recipe's `dtype`,
e.g. bf16), with every intermediate rounded to it where mergekit rounds, so the result
equals mergekit 0.1.4's bit for bit on the same torch:

- task vectors δᵢ = θᵢ − θ_base in that dtype;
- magnitude trim keeps the first k = ⌊density·n⌋ entries of a descending
  `torch.argsort` of |δ| (computed in fp32 on the CPU), which is how mergekit breaks
  ties at the threshold: the order of the same torch sort, not the index order the
  default numerics use;
- Breadcrumbs ranks by an ascending `torch.sort` and keeps ranks [n_bot, n − n_top):
  with n_top = 0 (⌊gamma·n⌋ = 0, small tensors) that range is empty in mergekit, which
  zeroes the whole task vector; repeated here;
- DELLA's MagPrune ranks |δ| with `torch.argsort` along the second dimension (a 1-D
  tensor as one row), holds the ranks 1 … m in the working dtype (bf16 on the CPU
  for bf16 inputs, so ranks above 256 are rounded), keeps with probability
  density − ε + 2ε·(r − r_min)/(r_max − r_min), and rescales to the former L1 norm;
  density ± ε must lie strictly inside (0, 1);
- the weighted deltas wᵢ·δᵢ are stacked and reduced with `sum(dim=0)`, the TIES sign
  is that of Σᵢ wᵢδᵢ with 0 counting as +, the divisor is Σ of the agreeing weights
  (0 → 1), and base + mixed is rounded once to the dtype.
"""

from __future__ import annotations

import torch


def _rescale_l1(delta: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _finish(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    masked = delta * mask
    return _rescale_l1(delta, masked) if rescale else masked


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the k largest |δ| in the order of a descending argsort."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        raise ValueError(f"density {density} keeps no entry of a {delta.numel()}-entry tensor")
    mask = torch.zeros_like(delta)
    mags = delta.abs().view(-1)
    if mags.device.type == "cpu":
        mags = mags.float()
    mask.view(-1)[torch.argsort(mags, descending=True)[:k]] = 1
    return _finish(delta, mask, rescale)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: bool
) -> torch.Tensor:
    """Breadcrumbs' mask, ranks [n_bot, n − n_top) of an ascending sort of |δ|."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    mags = delta.abs().view(-1)
    if mags.device.type == "cpu":
        mags = mags.float()
    order = torch.sort(mags, descending=False).indices
    mask = torch.zeros_like(delta)
    # A stop of -0 is 0: with no outliers to drop, the kept range is empty.
    mask.view(-1)[order[n_bot:-n_top]] = 1
    return _finish(delta, mask, rescale)


def bernoulli(
    delta: torch.Tensor, density: float, rescale: bool, rng: torch.Generator | None
) -> torch.Tensor:
    """DARE's random mask, keep probability `density`, drawn from `rng`."""
    if density >= 1:
        return delta
    cpu_wide = delta.device.type == "cpu" and delta.dtype != torch.bfloat16
    work = torch.float32 if cpu_wide else delta.dtype
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=rng)
    return _finish(delta.to(work), mask, rescale).to(delta.dtype)


def magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    rng: torch.Generator | None,
) -> torch.Tensor:
    """DELLA's magnitude-ranked random mask, keep probabilities drawn from `rng`."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"density {density:g} ± epsilon {epsilon:g} must lie strictly between 0 and 1 "
            "in mergekit's numerics"
        )
    shape = delta.shape
    cpu_wide = delta.device.type == "cpu" and delta.dtype != torch.bfloat16
    work = torch.float32 if cpu_wide else delta.dtype
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(rows.abs(), dim=1).argsort(dim=1).to(work) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    spread = ((ranks - low) / (high - low)).clamp(0, 1)
    probs = (density - epsilon) + spread * 2 * epsilon
    mask = torch.bernoulli(probs, generator=rng).to(work)
    return _finish(rows.to(work), mask, rescale).to(delta.dtype).reshape(shape)


def sign_agreement(stacked: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """Where each stacked delta's sign is that of the deltas' sum (0 counting as +)."""
    signs = stacked.sign().to(mask_dtype)
    elected = (stacked.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return signs == elected


def task_vectors(tensors: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(base.dtype) - base for t in tensors]


def combine(
    deltas: list[torch.Tensor],
    base: torch.Tensor,
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    int8_mask: bool = False,
) -> torch.Tensor:
    """base + λ · (Σ wᵢδᵢ, masked by the TIES sign election when `consensus`), divided by
    the summed (agreeing) weights when `normalize`; rounded to base's dtype."""
    if not deltas:
        return base
    stacked = torch.stack(deltas, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w.view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if consensus:
        agree = sign_agreement(weighted, torch.int8 if int8_mask else base.dtype)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)
