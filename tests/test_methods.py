"""Merge methods called directly: universal invariants for every registered method,
closed-form checks on hand-made tensors, and a few seeded property checks.

Expected values are worked out by hand in the comments or re-derived with plain
Python / NumPy formulas written here, never by calling another merge method's code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import valid_value

from weightops.merge import all_methods, get_method
from weightops.merge.registry import MethodSpec, ParamSpec
from weightops.merge.sparsify import magnitude

# --------------------------------------------------------------------------- helpers


def _value(spec: ParamSpec):
    """A valid value for a parameter: its default, or one inside its range."""
    return spec.default if not spec.required else valid_value(spec)


def _n_models(spec: MethodSpec) -> int:
    n = max(spec.min_models, 2)
    return min(n, spec.max_models) if spec.max_models is not None else n


def _params(spec: MethodSpec, n: int) -> dict:
    out = {}
    for p in spec.params.values():
        v = _value(p)
        out[p.name] = [v] * n if p.per_model else v
    return out


def _clones(tensors, base):
    # Methods may overwrite their inputs (the engine hands them private copies).
    return [t.clone() for t in tensors], (None if base is None else base.clone())


def _run(
    spec: MethodSpec,
    tensors,
    base,
    params,
    seed: int = 0,
    name: str = "model.layers.0.mlp.down_proj.weight",
) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    stats = None
    if spec.observer is not None:
        observer = spec.observer()
        observer.observe(name, *_clones(tensors, base), params)
        stats = observer.result()
    return spec(*_clones(tensors, base), params, rng=rng, stats=stats, name=name)


def call(name: str, tensors, base, seed: int = 0, **params) -> torch.Tensor:
    """Call method `name` with the given parameters (defaults for the rest)."""
    spec = get_method(name)
    full = {p.name: p.default for p in spec.params.values()}
    for p in spec.params.values():
        if p.per_model and full[p.name] is not None and not isinstance(full[p.name], list):
            full[p.name] = [full[p.name]] * len(tensors)
        if p.per_model and full[p.name] is None:
            full[p.name] = [None] * len(tensors)
    full.update({k.rstrip("_"): v for k, v in params.items()})
    unknown = set(full) - set(spec.params)
    assert not unknown, unknown
    tensors, base = _clones(tensors, base)
    return spec(tensors, base, full, rng=torch.Generator().manual_seed(seed))


def T(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


METHODS = sorted(all_methods())
SHAPES = [(7,), (5, 6), (3, 4, 2), (0,), (0, 4)]


# ------------------------------------------------------- every registered method


def test_builtin_methods_are_registered():
    expected = {
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "model_stock",
        "passthrough",
        "model_averaging",
        "tsv_m",
        "r_tsvm",
    }
    assert expected <= set(all_methods())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", METHODS)
def test_every_method_shape_dtype_finite(name, shape):
    spec = all_methods()[name]
    n = _n_models(spec)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g)
    tensors = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    out = _run(spec, tensors, None if spec.base == "unused" else base, _params(spec, n))
    assert out.shape == torch.Size(shape)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", METHODS)
def test_every_method_merging_identical_models_returns_the_model(name, shape):
    spec = all_methods()[name]
    n = _n_models(spec)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    tensors = [x.clone() for _ in range(n)]
    base = None if spec.base == "unused" else x.clone()
    out = _run(spec, tensors, base, _params(spec, n))
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [m for m in METHODS if all_methods()[m].params.get("density")])
def test_sparsifying_methods_identity_holds_with_density_below_one(name):
    # All task vectors are zero: dropping / trimming / rescaling zeros keeps zeros.
    spec = all_methods()[name]
    n = _n_models(spec)
    x = torch.randn(50, generator=torch.Generator().manual_seed(3))
    params = _params(spec, n)
    params["density"] = [0.3] * n
    out = _run(spec, [x.clone() for _ in range(n)], x.clone(), params)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


@pytest.mark.parametrize("name", [m for m in METHODS if all_methods()[m].elementwise])
def test_elementwise_methods_agree_on_row_blocks(name):
    # `elementwise=True` lets the engine merge row blocks separately.
    spec = all_methods()[name]
    n = _n_models(spec)
    g = torch.Generator().manual_seed(13)
    base = torch.randn(9, 5, generator=g)
    tensors = [base + torch.randn(9, 5, generator=g) for _ in range(n)]
    b = None if spec.base == "unused" else base
    params = _params(spec, n)
    whole = _run(spec, tensors, b, params)
    blocks = [
        _run(spec, [t[r : r + 4] for t in tensors], None if b is None else b[r : r + 4], params)
        for r in range(0, 9, 4)
    ]
    torch.testing.assert_close(torch.cat(blocks), whole, rtol=0, atol=0)


# ------------------------------------------------------------------------ linear


def test_linear_normalized_weighted_mean():
    # (1·[1, 2] + 3·[3, 4]) / 4 = [10, 14] / 4
    out = call("linear", [T(1, 2), T(3, 4)], None, weight=[1.0, 3.0], normalize=True)
    torch.testing.assert_close(out, T(2.5, 3.5))


def test_linear_without_normalize_is_a_weighted_sum():
    out = call("linear", [T(1, 2), T(3, 4)], None, weight=[1.0, 3.0], normalize=False)
    torch.testing.assert_close(out, T(10, 14))


def test_linear_single_model_and_zero_weight():
    torch.testing.assert_close(call("linear", [T(1, -2)], None, weight=[0.25]), T(1, -2))
    out = call("linear", [T(1, 2), T(3, 4)], None, weight=[0.0, 2.0])
    torch.testing.assert_close(out, T(3, 4))


def test_linear_weights_summing_to_zero_cannot_be_normalized():
    with pytest.raises(ValueError, match="sum to 0"):
        call("linear", [T(1, 2), T(3, 4)], None, weight=[0.0, 0.0], normalize=True)


def test_linear_ignores_base():
    a = call("linear", [T(1, 2), T(3, 4)], None, weight=[1.0, 1.0])
    b = call("linear", [T(1, 2), T(3, 4)], T(100, 100), weight=[1.0, 1.0])
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------- slerp


def _np_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Independent float64 SLERP over the flattened tensors (lerp when nearly parallel)."""
    fa, fb = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    cos = float(np.dot(fa / np.linalg.norm(fa), fb / np.linalg.norm(fb)))
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    om = math.acos(cos)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


def test_slerp_endpoints_are_exact():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    assert torch.equal(call("slerp", [b], a, t=0.0), a)
    assert torch.equal(call("slerp", [b], a, t=1.0), b)


def test_slerp_endpoints_exact_in_the_nearly_parallel_branch():
    a = torch.linspace(1, 2, 10)
    b = a * 1.0001 + 1e-4
    assert torch.equal(call("slerp", [b], a, t=0.0), a)
    assert torch.equal(call("slerp", [b], a, t=1.0), b)


def test_slerp_orthogonal_unit_vectors_halfway():
    a, b = T(1, 0), T(0, 1)
    out = call("slerp", [b], a, t=0.5)
    torch.testing.assert_close(out, (a + b) / math.sqrt(2))


def test_slerp_rotates_by_t_times_the_angle():
    # 60° apart on the unit circle: t = 0.25 lands at 15°.
    a, b = T(1, 0), T(math.cos(math.pi / 3), math.sin(math.pi / 3))
    out = call("slerp", [b], a, t=0.25)
    torch.testing.assert_close(out, T(math.cos(math.pi / 12), math.sin(math.pi / 12)))


def test_slerp_coefficients_apply_to_unnormalised_tensors():
    # Directions are orthogonal (Ω = π/2), so both coefficients are sin(π/4) at t = 0.5.
    out = call("slerp", [T(0, 3)], T(2, 0), t=0.5)
    torch.testing.assert_close(out, T(2 / math.sqrt(2), 3 / math.sqrt(2)))


def test_slerp_nearly_parallel_falls_back_to_lerp():
    a, b = T(1, 0), T(1, 1e-3)  # cos ≈ 0.9999995 > 0.9995
    out = call("slerp", [b], a, t=0.3)
    torch.testing.assert_close(out, 0.7 * a + 0.3 * b)


def test_slerp_matches_independent_formula_on_random_matrices():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    for t in (0.1, 0.5, 0.8):
        out = call("slerp", [b], a, t=t)
        expected = torch.from_numpy(_np_slerp(a.numpy(), b.numpy(), t)).float()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- task arithmetic


def test_task_arithmetic_weight_zero_returns_base():
    base = T(1, -2, 3)
    assert torch.equal(call("task_arithmetic", [T(5, 5, 5)], base, weight=[0.0]), base)


def test_task_arithmetic_lambda_and_weights():
    base = T(1, 1, 1)
    a, b = T(2, 3, 1), T(1, 0, 4)  # deltas [1, 2, 0] and [0, -1, 3]
    out = call("task_arithmetic", [a, b], base, weight=[0.5, 2.0], lambda_=3.0)
    # 1 + 3·(0.5·[1, 2, 0] + 2·[0, -1, 3]) = 1 + 3·[0.5, -1, 6]
    torch.testing.assert_close(out, T(2.5, -2, 19))


def test_task_arithmetic_lambda_as_recipe_name():
    # Recipes call it `lambda`; the registry maps it to the `lambda_` argument.
    out = call("task_arithmetic", [T(2.0)], T(1.0), weight=[1.0], **{"lambda": 4.0})
    torch.testing.assert_close(out, T(5.0))


def test_task_arithmetic_negative_weight_subtracts_the_task():
    base, ft = T(1, 2), T(3, 1)
    out = call("task_arithmetic", [ft], base, weight=[-1.0])
    torch.testing.assert_close(out, T(-1, 3))


def test_task_arithmetic_normalize_divides_by_weight_sum():
    base = T(0, 0)
    out = call("task_arithmetic", [T(2, 4), T(4, 0)], base, weight=[1.0, 3.0], normalize=True)
    torch.testing.assert_close(out, T((2 + 12) / 4, 4 / 4))
    # Weights summing to 0: normalisation is skipped, not a division by zero.
    out = call("task_arithmetic", [T(2, 4), T(4, 0)], base, weight=[1.0, -1.0], normalize=True)
    torch.testing.assert_close(out, T(-2, 4))


# -------------------------------------------------------------------------- ties


def test_ties_hand_worked_trim_elect_disjoint_mean():
    base = T(1, 1, 1, 1)
    a = base + T(2, -3, 0.5, 1)  # trim to top 2: [2, -3, 0, 0]
    b = base + T(-6, 0.1, -0.2, 4)  # trim to top 2: [-6, 0, 0, 4]
    # weighted (wa=1, wb=0.5): a [2, -3, 0, 0], b [-3, 0, 0, 2]; sum [-1, -3, 0, 2]
    # elected signs [-, -, +, +]; agreeing: entry0 b, entry1 a, entry2 none, entry3 b
    # disjoint sum [-3, -3, 0, 2]; agreeing weights [0.5, 1, -, 0.5]
    out = call("ties", [a, b], base, weight=[1.0, 0.5], density=[0.5, 0.5], normalize=True)
    torch.testing.assert_close(out, base + T(-6, -3, 0, 4))
    out = call("ties", [a, b], base, weight=[1.0, 0.5], density=[0.5, 0.5], normalize=False)
    torch.testing.assert_close(out, base + T(-3, -3, 0, 2))
    out = call(
        "ties", [a, b], base, weight=[1.0, 0.5], density=[0.5, 0.5], normalize=False, lambda_=2.0
    )
    torch.testing.assert_close(out, base + T(-6, -6, 0, 4))


def test_ties_sign_election_tie_goes_to_plus():
    # Weighted deltas +1 and -1 cancel: the elected sign is +, so only the + survives.
    out = call("ties", [T(1.0), T(-1.0)], T(0.0), weight=[1.0, 1.0], normalize=True)
    torch.testing.assert_close(out, T(1.0))


def test_ties_keeps_exactly_k_with_ties_at_threshold():
    # Five equal magnitudes, density 0.4 → k = 2, kept in index order.
    out = call("ties", [T(1, 1, 1, 1, 1)], T(0, 0, 0, 0, 0), weight=[1.0], density=[0.4])
    assert torch.equal(out, T(1, 1, 0, 0, 0))
    # One clear winner and three tied at the threshold, density 0.6 → k = 3.
    out = call("ties", [T(0.5, -1, 3, 1, -1)], torch.zeros(5), weight=[1.0], density=[0.6])
    assert torch.equal(out, T(0, -1, 3, 1, 0))


def test_ties_rescale_restores_l1_norm():
    delta = T(4, -1, 2, 1)  # density 0.5 keeps [4, 0, 2, 0]; L1 8 → 6
    out = call("ties", [delta], torch.zeros(4), weight=[1.0], density=[0.5], rescale=True)
    torch.testing.assert_close(out, T(4, 0, 2, 0) * (8 / 6))


@pytest.mark.parametrize("w", [0.3, 1.0, 2.5, -0.7])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_ties_density_one_single_model_equals_task_arithmetic(w, lam):
    """With one model and density 1 nothing is trimmed and every non-zero delta agrees
    with the elected sign (its own), so TIES is task arithmetic:

      ties(weight=w, density=1, normalize=N, lambda=λ)
        == task_arithmetic(weight=w, normalize=N, lambda=λ)   for N in {true, false}.

    With normalize the disjoint mean divides w·δ by w, giving base + λ·δ (any w ≠ 0);
    task arithmetic with normalize divides by Σw = w likewise.
    """
    g = torch.Generator().manual_seed(6)
    base = torch.randn(8, 9, generator=g)
    ft = base + torch.randn(8, 9, generator=g)
    for normalize in (True, False):
        got = call("ties", [ft], base, weight=[w], density=[1.0], normalize=normalize, lambda_=lam)
        want = call("task_arithmetic", [ft], base, weight=[w], normalize=normalize, lambda_=lam)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # And the explicit formulas.
    expected_norm = base + lam * (ft - base)
    expected_sum = base + lam * w * (ft - base)
    got = call("ties", [ft], base, weight=[w], density=[1.0], normalize=True, lambda_=lam)
    torch.testing.assert_close(got, expected_norm, rtol=1e-6, atol=1e-6)
    got = call("ties", [ft], base, weight=[w], density=[1.0], normalize=False, lambda_=lam)
    torch.testing.assert_close(got, expected_sum, rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------- dare


@pytest.mark.parametrize("normalize", [True, False])
def test_dare_linear_density_one_equals_task_arithmetic(normalize):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(20, generator=g)
    fts = [base + torch.randn(20, generator=g) for _ in range(2)]
    got = call(
        "dare_linear",
        fts,
        base,
        weight=[0.4, 0.9],
        density=[1.0, 1.0],
        normalize=normalize,
        lambda_=1.5,
    )
    want = call("task_arithmetic", fts, base, weight=[0.4, 0.9], normalize=normalize, lambda_=1.5)
    torch.testing.assert_close(got, want)


def test_dare_ties_density_one_equals_ties_density_one():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(30, generator=g)
    fts = [base + torch.randn(30, generator=g) for _ in range(3)]
    for normalize in (True, False):
        got = call(
            "dare_ties", fts, base, weight=[0.4, 0.9, 0.2], density=[1.0] * 3, normalize=normalize
        )
        want = call(
            "ties", fts, base, weight=[0.4, 0.9, 0.2], density=[1.0] * 3, normalize=normalize
        )
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_dare_keeps_about_density_and_rescales_by_one_over_density(name, p):
    n = 100_000
    out = call(name, [torch.ones(n)], torch.zeros(n), weight=[1.0], density=[p], seed=11)
    kept = out != 0
    frac = kept.float().mean().item()
    assert abs(frac - p) < 0.01  # binomial sd ≈ 0.0015
    torch.testing.assert_close(out[kept], torch.full((int(kept.sum()),), 1 / p))


def test_dare_without_rescale_keeps_raw_deltas():
    n = 10_000
    out = call(
        "dare_linear",
        [torch.full((n,), 2.0)],
        torch.zeros(n),
        weight=[1.0],
        density=[0.5],
        rescale=False,
    )
    assert set(out.unique().tolist()) == {0.0, 2.0}


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_same_generator_seed_same_output_different_seed_differs(name):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(500, generator=g)
    fts = [base + torch.randn(500, generator=g) for _ in range(2)]
    kw = dict(weight=[0.5, 0.5], density=[0.5, 0.5])
    a = call(name, fts, base, seed=123, **kw)
    b = call(name, fts, base, seed=123, **kw)
    c = call(name, fts, base, seed=124, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------- breadcrumbs

_CRUMB = T(0.1, -5, 2, -0.3, 4, 1, -0.2, 3, 0.5, -6)


def test_breadcrumbs_drops_outliers_and_smallest_by_rank():
    # n = 10, gamma 0.2 → drop the 2 largest |δ| (-6, -5); density 0.5 → keep 5,
    # so the 3 smallest (0.1, -0.2, -0.3) go too.
    base = torch.full((10,), 2.0)
    out = call("breadcrumbs", [base + _CRUMB], base, weight=[1.0], density=[0.5], gamma=[0.2])
    kept = T(0, 0, 2, 0, 4, 1, 0, 3, 0.5, 0)
    torch.testing.assert_close(out, base + kept)
    out = call(
        "breadcrumbs", [base + _CRUMB], base, weight=[2.0], density=[0.5], gamma=[0.2], lambda_=0.5
    )
    torch.testing.assert_close(out, base + kept)


def test_breadcrumbs_rescale_restores_l1_norm():
    # The same pruning as above keeps 2, 4, 1, 3, 0.5 (L1 10.5) of a vector with L1 22.1;
    # mergekit's `rescale` scales the survivors back to the original L1 norm.
    kept = T(0, 0, 2, 0, 4, 1, 0, 3, 0.5, 0)
    out = call(
        "breadcrumbs",
        [_CRUMB],
        torch.zeros(10),
        weight=[1.0],
        density=[0.5],
        gamma=[0.2],
        rescale=True,
    )
    torch.testing.assert_close(out, kept * (22.1 / 10.5))


def test_breadcrumbs_density_plus_gamma_above_one_drops_fewer_outliers():
    # density 0.9 keeps 9 of 10; gamma 0.2 would drop 2, but only the largest can go.
    out = call("breadcrumbs", [_CRUMB], torch.zeros(10), weight=[1.0], density=[0.9], gamma=[0.2])
    expected = _CRUMB.clone()
    expected[9] = 0
    torch.testing.assert_close(out, expected)


def test_breadcrumbs_gamma_zero_is_magnitude_pruning():
    out = call("breadcrumbs", [_CRUMB], torch.zeros(10), weight=[1.0], density=[0.3], gamma=[0.0])
    torch.testing.assert_close(out, T(0, -5, 0, 0, 4, 0, 0, 0, 0, -6))


def test_breadcrumbs_density_one_keeps_whole_vector():
    out = call("breadcrumbs", [_CRUMB], torch.zeros(10), weight=[1.0], density=[1.0], gamma=[0.2])
    torch.testing.assert_close(out, _CRUMB)


def test_breadcrumbs_ties_sign_election():
    # density 1: no masking; weighted deltas a [1, -2, 3, 0], b [-3, 1, 1, 2]
    # sum [-2, -1, 4, 2] → signs [-, -, +, +]; agreeing: [b, a, a+b, b]
    # normalised: [-3/1, -2/1, (3+1)/2, 2/1]
    a, b = T(1, -2, 3, 0), T(-3, 1, 1, 2)
    out = call(
        "breadcrumbs_ties",
        [a, b],
        torch.zeros(4),
        weight=[1.0, 1.0],
        density=[1.0] * 2,
        normalize=True,
    )
    torch.testing.assert_close(out, T(-3, -2, 2, 2))
    out = call(
        "breadcrumbs_ties",
        [a, b],
        torch.zeros(4),
        weight=[1.0, 1.0],
        density=[1.0] * 2,
        normalize=False,
    )
    torch.testing.assert_close(out, T(-3, -2, 4, 2))


def test_breadcrumbs_ties_masks_before_election():
    # a's two largest are outliers (gamma 0.25 of 8 → 2) and are dropped before voting.
    a = T(-9, -8, 1, 1, 1, 1, 0.1, 0.1)
    b = T(1, 1, 0, 0, 0, 0, 0, 0)
    out = call(
        "breadcrumbs_ties",
        [a, b],
        torch.zeros(8),
        weight=[1.0, 1.0],
        density=[0.5, 1.0],
        gamma=[0.25, 0.0],
        normalize=False,
    )
    # a keeps 4 entries: ranks 3-6 (the four 1s); b is whole.
    torch.testing.assert_close(out, T(1, 1, 1, 1, 1, 1, 0, 0))


# ------------------------------------------------------------------- model stock


def test_model_stock_orthogonal_deltas_keep_base():
    base = T(1, 1, 1)
    out = call("model_stock", [base + T(1, 0, 0), base + T(0, 1, 0)], base)
    torch.testing.assert_close(out, base)


def test_model_stock_identical_deltas_give_average():
    base = T(1, 1, 1)
    ft = base + T(1, 2, -1)
    out = call("model_stock", [ft, ft.clone()], base)
    torch.testing.assert_close(out, ft)


def test_model_stock_two_models_at_45_degrees():
    base = T(0.5, -1.0)
    d1, d2 = T(1, 0), T(2, 2)  # cos = 1/√2
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    avg = base + (d1 + d2) / 2
    out = call("model_stock", [base + d1, base + d2], base)
    torch.testing.assert_close(out, t * avg + (1 - t) * base)


def test_model_stock_three_models_mean_pairwise_cosine():
    base = T(0, 0, 1)
    d = [T(1, 0, 0), T(0, 1, 0), T(1, 1, 0)]  # cosines 0, 1/√2, 1/√2
    c = (0 + 2 / math.sqrt(2)) / 3
    t = 3 * c / (1 + 2 * c)
    avg = base + sum(d) / 3
    out = call("model_stock", [base + x for x in d], base)
    torch.testing.assert_close(out, t * avg + (1 - t) * base)


def test_model_stock_antiparallel_pair_keeps_base():
    # cos = -1 with k = 2: 1 + (k-1)·cos = 0, no finite estimate.
    base = T(1, 2)
    out = call("model_stock", [base + T(1, 1), base - T(1, 1)], base)
    torch.testing.assert_close(out, base)


def test_model_stock_filter_wise_uses_one_cosine_per_row():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 2.0]])
    out = call("model_stock", [a, b], base, filter_wise=True)
    # row 0: orthogonal → base row; row 1: identical → their average
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
    # Per tensor: cos = (0 + 0 + 1 + 4) / (√6·√6) = 5/6 → t = (10/6)/(11/6) = 10/11.
    out = call("model_stock", [a, b], base, filter_wise=False)
    torch.testing.assert_close(out, (10 / 11) * (a + b) / 2)


# ------------------------------------------------------------------- passthrough


def test_passthrough_copies_and_scales():
    x = T(1, -2, 3)
    assert torch.equal(call("passthrough", [x], None, scale=[None]), x)
    torch.testing.assert_close(call("passthrough", [x], None, scale=[0.5]), T(0.5, -1, 1.5))
    assert torch.equal(call("passthrough", [x], None, scale=[0.0]), torch.zeros(3))


# ------------------------------------------------------------ property checks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_linear_normalized_is_invariant_to_scaling_all_weights(seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(4, 5, generator=g) for _ in range(3)]
    w = (torch.rand(3, generator=g) + 0.1).tolist()
    scale = float(torch.rand(1, generator=g) * 10 + 0.01)
    a = call("linear", tensors, None, weight=w, normalize=True)
    b = call("linear", tensors, None, weight=[x * scale for x in w], normalize=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # ... and it is a convex combination: within the inputs' elementwise range.
    stacked = torch.stack(tensors)
    assert (a >= stacked.min(0).values - 1e-6).all()
    assert (a <= stacked.max(0).values + 1e-6).all()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_slerp_of_unit_vectors_stays_on_the_sphere(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, generator=g)
    b = torch.randn(64, generator=g)
    a, b = a / a.norm(), b / b.norm()
    for t in torch.rand(5, generator=g).tolist():
        out = call("slerp", [b], a, t=t)
        lo, hi = min(a.norm(), b.norm()), max(a.norm(), b.norm())
        assert lo - 1e-5 <= out.norm() <= hi + 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_magnitude_keeps_exactly_k_largest(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 200, (1,), generator=g))
    # Small integer magnitudes so many entries tie at the threshold; no zeros.
    values = torch.randint(1, 4, (n,), generator=g).float()
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    delta = values * signs
    for density in (0.01, 0.1, 0.33, 0.5, 0.9, 0.999):
        out = magnitude(delta.clone(), density)
        k = max(1, int(density * n))
        kept = out != 0
        assert int(kept.sum()) == k
        assert torch.equal(out[kept], delta[kept])
        if k < n:
            assert delta[kept].abs().min() >= delta[~kept].abs().max()
    assert torch.equal(magnitude(delta.clone(), 1.0), delta)


@pytest.mark.parametrize("ties", [False, True])
def test_magnitude_exact_count_on_large_tensors(ties):
    # Large enough for any sampled / approximate threshold search to kick in.
    g = torch.Generator().manual_seed(12)
    n = 300_000
    delta = torch.randint(1, 6, (n,), generator=g).float() if ties else torch.randn(n, generator=g)
    for density in (0.05, 0.5, 0.73):
        out = magnitude(delta.clone(), density)
        k = max(1, int(density * n))
        kept = out != 0
        assert int(kept.sum()) == k
        assert delta[kept].abs().min() >= delta[~kept].abs().max()
