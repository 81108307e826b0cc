"""The spherical methods (nuslerp, multislerp, karcher) and the selective ones
(nearswap, arcee_fusion, ram, ramplus_tl), called directly.

Expected values are worked out by hand in the comments, from closed forms, or from
float64 NumPy re-derivations written here from each method's definition.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightops.merge import get_method


def call(name: str, tensors, base, seed: int = 0, **params) -> torch.Tensor:
    """Method `name` on clones of the inputs, defaults for unlisted parameters."""
    spec = get_method(name)
    full = {}
    for p in spec.params.values():
        full[p.name] = [p.default] * len(tensors) if p.per_model else p.default
    full.update(params)
    assert set(full) == set(spec.params), set(full) ^ set(spec.params)
    clones = [t.clone() for t in tensors]
    b = None if base is None else base.clone()
    return spec(clones, b, full, rng=torch.Generator().manual_seed(seed))


def T(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(got: torch.Tensor, want, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    want = torch.as_tensor(np.asarray(want), dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


R2 = 1 / math.sqrt(2)


# ----------------------------------------------------------------------- nuslerp


def _np_slerp_pair(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """SLERP of two vectors in float64; linear when |cos| > 0.9995, zero vector ⟂ all."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    om = math.acos(cos)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


def _np_nuslerp(a, b, base, w, flatten=True, row_wise=False) -> np.ndarray:
    a, b = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    t = w[1] / (w[0] + w[1]) if abs(w[0] + w[1]) >= 1e-6 else 0.5
    if base is not None:
        base = base.numpy().astype(np.float64)
        a, b = a - base, b - base
    if flatten or a.ndim < 2:
        out = _np_slerp_pair(a.ravel(), b.ravel(), t).reshape(a.shape)
    else:
        axis = 0 if row_wise else a.ndim - 1
        am, bm = np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1)
        out = np.empty_like(am)
        for idx in np.ndindex(*am.shape[:-1]):
            out[idx] = _np_slerp_pair(am[idx], bm[idx], t)
        out = np.moveaxis(out, -1, axis)
    return out if base is None else out + base


def test_nuslerp_orthogonal_unit_vectors_at_equal_weights():
    out = call("nuslerp", [T(1, 0), T(0, 1)], None, weight=[1.0, 1.0])
    close(out, [R2, R2])


def test_nuslerp_t_is_the_second_weights_share():
    # Weights 3 : 1 → t = 1/4; 60° apart on the unit circle → 15° from the first.
    b = T(math.cos(math.pi / 3), math.sin(math.pi / 3))
    out = call("nuslerp", [T(1, 0), b], None, weight=[3.0, 1.0])
    close(out, [math.cos(math.pi / 12), math.sin(math.pi / 12)])
    # Scaling both weights changes nothing.
    torch.testing.assert_close(call("nuslerp", [T(1, 0), b], None, weight=[0.3, 0.1]), out)


def test_nuslerp_weights_summing_to_zero_take_the_midpoint():
    out = call("nuslerp", [T(1, 0), T(0, 1)], None, weight=[1.0, -1.0])
    close(out, [R2, R2])


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_endpoints(flatten, row_wise, with_base):
    a, b = rand(4, 5, seed=1), rand(4, 5, seed=2)
    base = rand(4, 5, seed=3) if with_base else None
    kw = dict(nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    first = call("nuslerp", [a, b], base, weight=[1.0, 0.0], **kw)
    second = call("nuslerp", [a, b], base, weight=[0.0, 2.0], **kw)
    if base is None:  # no task vectors to subtract and add back: bit for bit
        assert torch.equal(first, a)
        assert torch.equal(second, b)
    else:
        torch.testing.assert_close(first, a)
        torch.testing.assert_close(second, b)


def test_nuslerp_endpoints_exact_in_the_linear_branch():
    a = torch.linspace(1, 2, 10)
    b = a * 1.0001 + 1e-4  # cos ≈ 1
    assert torch.equal(call("nuslerp", [a, b], None, weight=[1.0, 0.0]), a)
    assert torch.equal(call("nuslerp", [a, b], None, weight=[0.0, 1.0]), b)


def test_nuslerp_with_base_slerps_the_task_vectors():
    # Task vectors (1, 0) and (0, 2) are orthogonal: at t = ½ both coefficients are
    # sin(π/4)/sin(π/2) = 1/√2, so the merged task vector is (1/√2, 2/√2).
    base = T(1, 1)
    out = call("nuslerp", [base + T(1, 0), base + T(0, 2)], base, weight=[0.5, 0.5])
    close(out, [1 + R2, 1 + 2 * R2])


def test_nuslerp_rows_and_columns_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    rows = call("nuslerp", [a, b], None, weight=[1.0, 1.0], nuslerp_flatten=False)
    # row 0: orthogonal unit vectors → (1/√2, 1/√2); row 1: parallel → lerp (1.5, 0)
    close(rows, [[R2, R2], [1.5, 0.0]])
    cols = call(
        "nuslerp", [a, b], None, weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True
    )
    # column 0: (1, 1) and (0, 2) are 45° apart → sin(π/8)/sin(π/4)·((1, 1) + (0, 2));
    # column 1: (0, 0) counts as orthogonal to (1, 0) → sin(π/4)·(1, 0).
    k = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    close(cols, [[k * 1, R2], [k * 3, 0.0]])


def test_nuslerp_antiparallel_and_zero_vectors_stay_finite():
    # Antiparallel: linear, so the midpoint of ±(1, 0) is 0 rather than a division by sin π.
    close(call("nuslerp", [T(1, 0), T(-1, 0)], None, weight=[1.0, 1.0]), [0.0, 0.0])
    # A zero vector is treated as orthogonal: sin(π/4)·(0, 2).
    close(call("nuslerp", [T(0, 0), T(0, 2)], None, weight=[1.0, 1.0]), [0.0, 2 * R2])
    # Two zero task vectors: the base comes back.
    base = T(3, 4)
    assert torch.equal(call("nuslerp", [base, base], base, weight=[1.0, 1.0]), base)


@pytest.mark.parametrize("shape", [(6, 7), (3, 4, 5), (9,)])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_numpy(shape, flatten, row_wise, with_base):
    a, b = rand(*shape, seed=4), rand(*shape, seed=5)
    base = rand(*shape, seed=6) if with_base else None
    if not with_base:
        b[0] = a[0] * 2  # one parallel pair of rows/columns for the linear branch
    w = [0.7, 0.4]
    out = call(
        "nuslerp", [a, b], base, weight=w, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise
    )
    close(out, _np_nuslerp(a, b, base, w, flatten, row_wise), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- multislerp


def _np_multislerp(tensors, base, w, normalize=True, eps=1e-8) -> np.ndarray:
    """mergekit's documented algorithm in float64, tangent space and all: project the
    unit inputs to the tangent space at their weighted mean direction, blend, map back
    with the exponential map, scale by the weighted mean norm."""
    x = np.stack([t.numpy().astype(np.float64).ravel() for t in tensors])
    if base is not None:
        x = x - base.numpy().astype(np.float64).ravel()
    w = np.asarray(w, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    n = np.linalg.norm(x, axis=1)
    u = x / (n[:, None] + eps)
    m = w @ u
    m = m / np.linalg.norm(m)
    v = u - (u @ m)[:, None] * m
    tau = w @ v
    r = np.linalg.norm(tau) + eps
    out = (m * np.cos(r) + tau * np.sin(r) / r) * (w @ n)
    out = out.reshape(tensors[0].shape)
    return out if base is None else out + base.numpy().astype(np.float64)


def test_multislerp_two_orthogonal_unit_vectors_at_equal_weights_is_slerp_midpoint():
    out = call("multislerp", [T(1, 0), T(0, 1)], None, weight=[1.0, 1.0])
    close(out, [R2, R2])


def test_multislerp_two_models_equal_slerp_at_equal_weights_and_equal_norms():
    a, b = rand(5, 6, seed=7), rand(5, 6, seed=8)
    b = b * (a.norm() / b.norm())
    out = call("multislerp", [a, b], None, weight=[0.5, 0.5])
    want = _np_slerp_pair(a.double().numpy().ravel(), b.double().numpy().ravel(), 0.5)
    close(out, want.reshape(5, 6), rtol=1e-5, atol=1e-6)


def test_multislerp_two_models_away_from_the_midpoint_is_not_slerp():
    # Orthogonal unit vectors at weights ¾, ¼: the weighted mean direction (3, 1)/√10,
    # i.e. atan(1/3) ≈ 18.4° from the first, where SLERP at t = ¼ lands at 22.5°.
    out = call("multislerp", [T(1, 0), T(0, 1)], None, weight=[0.75, 0.25])
    close(out, [3 / math.sqrt(10), 1 / math.sqrt(10)])
    slerp = [math.cos(math.pi / 8), math.sin(math.pi / 8)]
    assert not torch.allclose(out, T(*slerp), atol=1e-3)


def test_multislerp_norm_is_the_weighted_mean_norm():
    # Directions (1, 0) and (0, 1) at equal weights → (1, 1)/√2; norms 2 and 4 → 3.
    out = call("multislerp", [T(2, 0), T(0, 4)], None, weight=[1.0, 1.0])
    close(out, [3 * R2, 3 * R2])
    # Without normalising the weights both the direction sum and the norm sum double.
    out = call("multislerp", [T(2, 0), T(0, 4)], None, weight=[1.0, 1.0], normalize_weights=False)
    close(out, [6 * R2, 6 * R2])


def test_multislerp_with_base_blends_task_vectors():
    base = T(1, -1)
    out = call("multislerp", [base + T(2, 0), base + T(0, 4)], base, weight=[1.0, 1.0])
    close(out, [1 + 3 * R2, -1 + 3 * R2])


def test_multislerp_cancelling_directions():
    # Two inputs: linear fallback, 0.5·(1, 2) + 0.5·(−1, −2) = 0.
    close(call("multislerp", [T(1, 2), T(-1, -2)], None, weight=[1.0, 1.0]), [0.0, 0.0])
    # Three inputs whose weighted directions cancel have no spherical mean.
    with pytest.raises(ValueError, match="cancel"):
        call("multislerp", [T(1, 0), T(-1, 0), T(0, 0)], None, weight=[1.0, 1.0, 1.0])
    # ... but three unchanged task vectors are no conflict: the base comes back.
    base = T(0.5, 2)
    out = call("multislerp", [base, base, base], base, weight=[1.0, 2.0, 3.0])
    assert torch.equal(out, base)


def test_multislerp_weights_summing_to_zero_cannot_be_normalized():
    with pytest.raises(ValueError, match="sum to 0"):
        call("multislerp", [T(1, 0), T(0, 1)], None, weight=[1.0, -1.0])


def test_multislerp_single_model_is_returned():
    assert torch.equal(call("multislerp", [T(1, -2)], None, weight=[0.3]), T(1, -2))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_numpy_tangent_space_algorithm(with_base, normalize):
    xs = [rand(4, 9, seed=s) for s in (10, 11, 12, 13)]
    base = rand(4, 9, seed=14) if with_base else None
    w = [0.1, 0.5, 0.3, 0.9]
    out = call("multislerp", xs, base, weight=w, normalize_weights=normalize)
    close(out, _np_multislerp(xs, base, w, normalize), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- karcher


def _np_karcher(tensors, max_iter=10, tol=1e-5) -> np.ndarray:
    """Karcher mean on the sphere in float64, from its definition (equal weights)."""
    x = [t.numpy().astype(np.float64).ravel() for t in tensors]
    n = [np.linalg.norm(v) for v in x]
    units = [v / nv for v, nv in zip(x, n, strict=True) if nv > tol]
    if not units:
        return np.zeros(tensors[0].shape)
    u = np.mean(units, axis=0)
    u = units[0] if np.linalg.norm(u) < tol else u / np.linalg.norm(u)
    for _ in range(max_iter):
        grad = np.zeros_like(u)
        for ui in units:
            c = float(np.clip(u @ ui, -1, 1))
            th = math.acos(c)
            if th >= tol and math.sin(th) >= 1e-8:
                grad += th / math.sin(th) * (ui - c * u) / len(units)
        g = np.linalg.norm(grad)
        if g < tol:
            break
        u = math.cos(g) * u + math.sin(g) * grad / g
        u /= np.linalg.norm(u)
    return (np.mean(n) * u).reshape(tensors[0].shape)


def test_karcher_two_points_is_the_scaled_geodesic_midpoint():
    a, b = rand(6, 5, seed=20), 3 * rand(6, 5, seed=21)
    out = call("karcher", [a, b], None)
    mid = a / a.norm() + b / b.norm()
    close(out, (a.norm() + b.norm()) / 2 * mid / mid.norm(), rtol=1e-5, atol=1e-6)


def test_karcher_on_the_circle_is_the_mean_angle():
    # Directions at 0°, 60° and 90° (within a half circle): the Karcher mean is the
    # mean angle, 50°; the norms 1, 2, 3 average to 2.
    angles = [0.0, math.pi / 3, math.pi / 2]
    xs = [r * T(math.cos(a), math.sin(a)) for r, a in zip((1, 2, 3), angles, strict=True)]
    out = call("karcher", xs, None, tol=1e-7)
    mean = math.radians(50)
    close(out, [2 * math.cos(mean), 2 * math.sin(mean)], rtol=1e-5, atol=1e-5)
    # The first guess, the normalised sum of directions, is off by more than a degree.
    guess = call("karcher", xs, None, max_iter=0)
    assert abs(math.atan2(guess[1], guess[0]) - mean) > math.radians(1)


def test_karcher_identical_points_return_the_point():
    x = rand(7, 3, seed=22)
    torch.testing.assert_close(call("karcher", [x, x, x], None), x, rtol=1e-6, atol=1e-6)


def test_karcher_converges_within_max_iter():
    xs = [rand(50, seed=s) for s in (23, 24, 25)]
    converged = _np_karcher(xs, max_iter=1000, tol=1e-12)
    out = call("karcher", xs, None)
    close(out, converged, rtol=1e-5, atol=2e-5)
    # The step fell below tol before the default 10 iterations: more change nothing.
    assert torch.equal(call("karcher", xs, None, max_iter=100), out)
    # At the result the mean of the log maps (the Riemannian gradient) vanishes.
    u = converged.ravel() / np.linalg.norm(converged)
    grad = np.zeros_like(u)
    for x in xs:
        ui = x.double().numpy() / x.double().norm().item()
        th = math.acos(float(np.clip(u @ ui, -1, 1)))
        grad += th / math.sin(th) * (ui - math.cos(th) * u)
    assert np.linalg.norm(grad) < 1e-8


@pytest.mark.parametrize("max_iter", [0, 1, 3, 10])
def test_karcher_matches_numpy(max_iter):
    xs = [rand(8, 6, seed=s) * (1 + s % 3) for s in (26, 27, 28, 29)]
    out = call("karcher", xs, None, max_iter=max_iter)
    close(out, _np_karcher(xs, max_iter=max_iter), rtol=1e-5, atol=1e-5)


def test_karcher_zero_tensors_count_in_the_norm_but_not_the_direction():
    x = T(3, 4)
    close(call("karcher", [x, torch.zeros(2)], None), [1.5, 2.0])
    assert torch.equal(call("karcher", [torch.zeros(3), torch.zeros(3)], None), torch.zeros(3))


def test_karcher_antipodal_points_stay_finite():
    # The mean direction is undefined: the first input's direction is kept.
    close(call("karcher", [T(1, 0), T(-1, 0)], None), [1.0, 0.0])


# ---------------------------------------------------------------------- nearswap


def test_nearswap_hand_worked():
    base = T(0, 0, 0, 1)
    other = T(0.5, 2, -0.1, 1)
    # |Δ| = [0.5, 2, 0.1, 0] → w = clamp(0.2/|Δ|) = [0.4, 0.1, 1, 1]
    out = call("nearswap", [other], base, t=0.2)
    close(out, [0.2, 0.2, -0.1, 1.0])


def test_nearswap_t_zero_keeps_base_large_t_takes_other():
    base, other = rand(10, seed=30), rand(10, seed=31)
    assert torch.equal(call("nearswap", [other], base, t=0.0), base)
    assert torch.equal(call("nearswap", [other], base, t=100.0), other)


def test_nearswap_matches_numpy():
    base, other = rand(6, 8, seed=32), rand(6, 8, seed=33)
    t = 0.3
    a, b = base.double().numpy(), other.double().numpy()
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    close(call("nearswap", [other], base, t=t), w * b + (1 - w) * a)


# ------------------------------------------------------------------ arcee_fusion


def _np_arcee(other: torch.Tensor, base: torch.Tensor) -> np.ndarray:
    b, a = other.double().numpy(), base.double().numpy()

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    score = np.abs(b - a) * kl
    s = np.sort(score.ravel())
    last = s.size - 1
    fence = s[last // 2] + 1.5 * (s[3 * last // 4] - s[last // 4])
    return a + (b - a) * (score >= fence)


def test_arcee_fusion_one_row_keeps_the_outlying_change():
    # One row: the KL factor is one positive number, so the fence acts on |Δ| alone.
    # Sorted |Δ| = [.1 .2 .3 .4 .5 .7 .8 5]; n − 1 = 7 → ranks 1, 3, 5: Q1 .2, Q2 .4,
    # Q3 .7 → fence .4 + 1.5·.5 = 1.15 → only the 5 survives.
    base = torch.zeros(8)
    delta = T(0.1, -0.2, 0.3, 0.4, 0.5, -0.7, 0.8, 5.0)
    out = call("arcee_fusion", [base + delta], base)
    close(out, [0, 0, 0, 0, 0, 0, 0, 5.0])


def test_arcee_fusion_ignores_rows_whose_softmax_does_not_change():
    # Row 1 moves by a constant, which softmax cannot see: KL 0, scores 0, dropped.
    # Scores: eight 0s (row 1) and k·|Δ| for row 0; n − 1 = 15 → ranks 3, 7, 11 are
    # 0, 0 and k·0.4 (row 0's fourth smallest) → fence 0.6k: keeps 0.7, 0.8 and 5.
    base = torch.zeros(2, 8)
    other = torch.stack([T(0.1, -0.2, 0.3, 0.4, 0.5, -0.7, 0.8, 5.0), torch.full((8,), 10.0)])
    out = call("arcee_fusion", [other], base)
    close(out, [[0, 0, 0, 0, 0, -0.7, 0.8, 5.0], [0] * 8])


@pytest.mark.parametrize("shape", [(12, 10), (3, 4, 6), (40,)])
def test_arcee_fusion_matches_numpy(shape):
    base = rand(*shape, seed=40)
    other = base + 0.5 * rand(*shape, seed=41)
    out = call("arcee_fusion", [other], base)
    want = _np_arcee(other, base)
    close(out, want)
    kept = (out != base).float().mean().item()
    assert 0 < kept < 1


def test_arcee_fusion_large_tensor_samples_reproducibly():
    # Over 10⁶ entries the quartiles come from a seeded sample: same seed, same result,
    # and the kept share is close to the exact fence's.
    n = 1_200_000
    base = rand(n, seed=42)
    other = base + rand(n, seed=43) * torch.linspace(0.1, 1, n)
    a = call("arcee_fusion", [other], base, seed=1)
    b = call("arcee_fusion", [other], base, seed=1)
    assert torch.equal(a, b)
    score = (other - base).abs().double().numpy()  # one row: the KL factor cancels
    s = np.sort(score)
    last = n - 1
    fence = s[last // 2] + 1.5 * (s[3 * last // 4] - s[last // 4])
    exact = (score >= fence).mean()
    got = (a != base).double().mean().item()
    assert abs(got - exact) < 0.002, (got, exact)


# --------------------------------------------------------------------------- ram

_BASE = T(1, 1, 1, 1, 1, 1)
_A = _BASE + T(1, 0, 2, 1e-6, 3, 7)  # active at 0, 2, 4, 5
_B = _BASE + T(0, 4, 2, 0, -1, 0)  # active at 1, 2, 4
# counts [1, 1, 2, 0, 2, 1]: unique 0, 1, 5; shared 2, 4; inactive 3


def test_ram_unique_whole_shared_averaged_hand_worked():
    out = call("ram", [_A, _B], _BASE)
    close(out, _BASE + T(1, 4, 2, 0, 1, 7))


def test_ram_epsilon_zero_counts_every_change():
    out = call("ram", [_A, _B], _BASE, epsilon=0.0)
    close(out, _BASE + T(1, 4, 2, 1e-6, 1, 7), rtol=0, atol=1e-7)


def test_ramplus_tl_boosts_unique_changes_hand_worked():
    # A: unique 2 (positions 0, 5), shared 2 → ρ = 1; B: unique 1, shared 2 → ρ = 2.
    # Defaults r 0.1, alpha 0.2: both ρ are capped at 0.2, λ = 1.02.
    out = call("ramplus_tl", [_A, _B], _BASE)
    close(out, _BASE + T(1.02, 4.08, 2, 0, 1, 7.14))
    # r 1, alpha 5: λ_A = 2, λ_B = 3; shared positions are still averaged.
    out = call("ramplus_tl", [_A, _B], _BASE, r=1.0, alpha=5.0)
    close(out, _BASE + T(2, 12, 2, 0, 1, 14))
    # r 0 is RAM.
    torch.testing.assert_close(
        call("ramplus_tl", [_A, _B], _BASE, r=0.0), call("ram", [_A, _B], _BASE)
    )


def test_ramplus_tl_model_without_unique_changes_stays_finite():
    # B only changes what A changes too: no unique entries, ρ_B would be 2/ε.
    base = torch.zeros(4)
    a, b = T(1, 2, 3, 4), T(1, 2, 0, 0)
    out = call("ramplus_tl", [a, b], base, epsilon=0.0, r=1.0, alpha=1.0)
    # A: unique 2 (positions 2, 3), shared 2 → ρ 1, λ 2.
    close(out, [1, 2, 6, 8])


def _np_ram(tensors, base, epsilon=1e-5, r=None, alpha=None) -> np.ndarray:
    """RAM (r None) or RAM+ tensor-local, per model as the definition reads."""
    b = base.double().numpy()
    d = np.stack([t.double().numpy() - b for t in tensors])
    active = np.abs(d) > epsilon
    c = active.sum(axis=0)
    unique, shared = c == 1, c > 1
    out = b.copy()
    for i in range(len(tensors)):
        lam = 1.0
        if r is not None:
            rho = (active[i] & shared).sum() / max((active[i] & unique).sum(), epsilon)
            lam = 1 + r * min(max(rho, 0), alpha)
        di = np.where(active[i], d[i], 0)
        out += np.where(unique, di * lam, 0) + np.where(shared, di / np.maximum(c, 1), 0)
    return out


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ram_and_ramplus_tl_match_numpy_on_sparse_task_vectors(n):
    base = rand(9, 11, seed=50)
    g = torch.Generator().manual_seed(51)
    xs = []
    for _ in range(n):
        keep = torch.rand(9, 11, generator=g) < 0.3  # RL-like sparse changes
        xs.append(base + keep * torch.randn(9, 11, generator=g))
    close(call("ram", xs, base), _np_ram(xs, base))
    close(call("ramplus_tl", xs, base, r=0.5, alpha=0.8), _np_ram(xs, base, r=0.5, alpha=0.8))
