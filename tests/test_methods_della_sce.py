"""DELLA (della, della_linear) and SCE called directly: hand-worked steps, statistics of
DELLA's random drop, and an independent NumPy re-derivation of SCE.

Expected values come from the comments' arithmetic, closed forms or the NumPy code
written here, never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightops.engine.plan import build_plan
from weightops.errors import MergeError, RecipeError
from weightops.merge import all_methods, get_method
from weightops.recipe import parse_recipe

DELLA = ["della", "della_linear"]


def call(name: str, tensors, base, seed: int = 0, **params) -> torch.Tensor:
    """Method `name` on clones of the inputs, defaults for the parameters not given."""
    spec = get_method(name)
    full = {}
    for p in spec.params.values():
        full[p.name] = [p.default] * len(tensors) if p.per_model else p.default
    full.update({k.rstrip("_"): v for k, v in params.items()})
    assert set(full) == set(spec.params), set(full) ^ set(spec.params)
    rng = torch.Generator().manual_seed(seed)
    return spec([t.clone() for t in tensors], base.clone(), full, rng=rng)


def T(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _sd(p: float, n: int) -> float:
    """Standard deviation of the kept share of n Bernoulli(p) draws."""
    return math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------ registration


def test_parameters_and_defaults_follow_mergekit():
    methods = all_methods()
    for name, normalize in (("della", True), ("della_linear", False)):
        spec = methods[name]
        assert spec.base == "required"
        assert spec.reference == "https://arxiv.org/abs/2406.11617"
        assert set(spec.params) == {
            "weight",
            "density",
            "epsilon",
            "lambda",
            "normalize",
            "rescale",
            "seed",
            "int8_mask",
        }
        p = spec.params
        assert p["weight"].required and p["weight"].per_model
        assert (p["density"].default, p["density"].per_model) == (1.0, True)
        assert (p["epsilon"].default, p["epsilon"].per_model) == (0.15, True)
        assert (p["lambda"].default, p["normalize"].default) == (1.0, normalize)
        assert (p["rescale"].default, p["int8_mask"].default) == (True, False)
    sce = methods["sce"]
    assert sce.base == "required" and sce.min_models == 2
    assert sce.reference == "https://arxiv.org/abs/2408.07990"
    assert set(sce.params) == {"select_topk", "int8_mask"}
    assert sce.params["select_topk"].default == 1.0


# ------------------------------------------------------------------ DELLA: by hand


@pytest.mark.parametrize("name", DELLA)
def test_della_kept_entries_are_divided_by_their_rank_probability(name):
    # |δ| ranks: 0.1 (i1) r0, 0.2 (i3) r1, 0.3 (i0) r2, 0.4 (i4) r3, 0.5 (i2) r4.
    # density 0.5, epsilon 0.2: p_r = 0.3 + 0.4·r/4 → by index [0.5, 0.3, 0.7, 0.4, 0.6].
    delta = T(0.3, -0.1, 0.5, 0.2, -0.4)
    p = T(0.5, 0.3, 0.7, 0.4, 0.6)
    base = T(1, 2, 3, 4, 5)
    seen = torch.zeros(5, dtype=torch.bool)
    for seed in range(60):
        out = call(name, [base + delta], base, seed, weight=[1.0], density=[0.5], epsilon=[0.2])
        kept = out != base
        seen |= kept
        torch.testing.assert_close(out[kept], (base + delta / p)[kept])
        torch.testing.assert_close(out[~kept], base[~kept])
    assert seen.all()


def test_della_ranks_each_row_on_its_own():
    # density 0.5 ± 0.5 over 3 entries: p = 0, 0.5, 1 for ranks 0, 1, 2 in every row.
    # Ranked over the whole tensor, 10 would get p = 0.6 and sometimes be kept.
    delta = torch.tensor([[1.0, 2.0, 3.0], [30.0, 20.0, 10.0]])
    for seed in range(30):
        out = call(
            "della_linear",
            [delta],
            torch.zeros(2, 3),
            seed,
            weight=[1.0],
            density=[0.5],
            epsilon=[0.5],
        )
        assert out[0, 0] == 0 and out[1, 2] == 0  # p = 0
        assert out[0, 2] == 3 and out[1, 0] == 30  # p = 1, divided by 1
        assert out[0, 1] in (0, 4) and out[1, 1] in (0, 40)  # p = 0.5, doubled


def test_della_ranks_three_dimensional_tensors_per_first_index():
    # Each first-index slice of 4 entries: p = 0, 1/3, 2/3, 1 by rank.
    delta = torch.tensor([[[4.0, 1.0], [2.0, 3.0]], [[-1.0, -2.0], [-3.0, -4.0]]])
    for seed in range(20):
        out = call(
            "della_linear",
            [delta],
            torch.zeros(2, 2, 2),
            seed,
            weight=[1.0],
            density=[0.5],
            epsilon=[0.5],
        )
        assert out[0, 0, 0] == 4 and out[1, 1, 1] == -4
        assert out[0, 0, 1] == 0 and out[1, 0, 0] == 0


def test_della_one_entry_rows_keep_with_probability_density():
    n = 20_000
    out = call(
        "della_linear",
        [torch.ones(n, 1)],
        torch.zeros(n, 1),
        weight=[1.0],
        density=[0.3],
        epsilon=[0.3],
        rescale=False,
    )
    assert abs((out != 0).float().mean().item() - 0.3) < 5 * _sd(0.3, n)


def test_della_equal_magnitudes_rank_in_index_order():
    # All |δ| equal: ranks follow the index, so p = 0, 0.25, 0.5, 0.75, 1.
    out = call(
        "della_linear",
        [T(1, -1, 1, -1, 1)],
        torch.zeros(5),
        weight=[1.0],
        density=[0.5],
        epsilon=[0.5],
        rescale=False,
    )
    assert out[0] == 0 and out[4] == 1


def test_della_without_rescale_keeps_raw_deltas():
    delta = torch.linspace(-1, 1, 101)[
        torch.randperm(101, generator=torch.Generator().manual_seed(0))
    ]
    out = call(
        "della_linear",
        [delta],
        torch.zeros(101),
        weight=[1.0],
        density=[0.5],
        epsilon=[0.3],
        rescale=False,
    )
    kept = out != 0
    assert 0 < int(kept.sum()) < 101
    assert torch.equal(out[kept], delta[kept])


@pytest.mark.parametrize("normalize", [True, False])
def test_della_linear_density_one_is_task_arithmetic(normalize):
    # Nothing dropped (epsilon unused): base + λ·Σ wᵢδᵢ [/ Σ wᵢ].
    base = T(1, 1, 1)
    a, b = base + T(1, 2, 0), base + T(0, -1, 3)
    out = call(
        "della_linear",
        [a, b],
        base,
        weight=[0.5, 2.0],
        lambda_=3.0,
        normalize=normalize,
        epsilon=[0.9, 0.9],
    )
    mixed = T(0.5, -1, 6) / (2.5 if normalize else 1)
    torch.testing.assert_close(out, base + 3 * mixed)


def test_della_density_one_is_ties_without_trimming():
    # weighted deltas a [1, -2, 3, 0], b [-3, 1, 1, 2]; sum [-2, -1, 4, 2] → [-, -, +, +]
    # agreeing: [b, a, a+b, b]; normalised by agreeing weights (1 each): [-3, -2, 2, 2]
    a, b = T(1, -2, 3, 0), T(-3, 1, 1, 2)
    out = call("della", [a, b], torch.zeros(4), weight=[1.0, 1.0])
    torch.testing.assert_close(out, T(-3, -2, 2, 2))
    out = call("della", [a, b], torch.zeros(4), weight=[1.0, 1.0], normalize=False, lambda_=0.5)
    torch.testing.assert_close(out, T(-1.5, -1, 2, 1))


# ------------------------------------------------------------ DELLA: statistics


def _ranked_rows(rows: int, m: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Rows of distinct magnitudes in random order and random signs, and each entry's
    rank within its row (0 = smallest |δ|), computed with NumPy."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.rand(rows, m, generator=g) + 0.5
    signs = torch.where(torch.rand(rows, m, generator=g) < 0.5, -1.0, 1.0)
    delta = mags * signs
    ranks = np.argsort(np.argsort(np.abs(delta.numpy()), axis=1), axis=1)
    return delta, ranks


@pytest.mark.parametrize("name", DELLA)
@pytest.mark.parametrize(("density", "epsilon"), [(0.4, 0.2), (0.5, 0.5), (0.8, 0.1)])
def test_della_share_kept_per_rank_matches_the_keep_probability(name, density, epsilon):
    rows, m = 4000, 8
    delta, ranks = _ranked_rows(rows, m, seed=1)
    out = call(
        name,
        [delta],
        torch.zeros(rows, m),
        seed=5,
        weight=[1.0],
        density=[density],
        epsilon=[epsilon],
        rescale=False,
    )
    kept = (out != 0).numpy()
    for r in range(m):
        p = density - epsilon + 2 * epsilon * r / (m - 1)
        share = kept[ranks == r].mean()
        assert abs(share - p) <= 5 * _sd(p, rows) + 1e-12, (r, share, p)
    # Over all ranks the keep rate averages density.
    assert abs(kept.mean() - density) <= 5 * math.sqrt(density * (1 - density) / kept.size)


def test_della_linear_epsilon_zero_keeps_every_entry_with_probability_density():
    rows, m, density = 3000, 10, 0.3
    delta, ranks = _ranked_rows(rows, m, seed=2)
    out = call(
        "della_linear",
        [delta],
        torch.zeros(rows, m),
        seed=3,
        weight=[1.0],
        density=[density],
        epsilon=[0.0],
    )
    kept = out != 0
    # Every kept entry was divided by the same p = density ...
    torch.testing.assert_close(out[kept], delta[kept] / density)
    # ... and every rank band keeps about density of its entries.
    for r in range(m):
        share = kept.numpy()[ranks == r].mean()
        assert abs(share - density) <= 5 * _sd(density, rows)


def test_della_linear_expectation_is_the_undropped_merge():
    # R identical rows: each column's mean over rows estimates E[out] at that entry.
    # Each model's kept entry is δ/p with probability p: mean δ, variance δ²(1 − p)/p.
    rows = 20_000
    base_row = T(0.5, -1, 2, 0, 1, 3)
    d_a, d_b = T(0.3, -1.2, 0.8, 2.0, -0.1, 0.5), T(-0.4, 0.9, 0.2, -1.5, 0.7, 1.1)
    w, lam, density, epsilon = (0.7, 0.4), 1.5, 0.5, 0.3
    base = base_row.repeat(rows, 1)
    out = call(
        "della_linear",
        [base + d_a, base + d_b],
        base,
        seed=8,
        weight=list(w),
        density=[density] * 2,
        epsilon=[epsilon] * 2,
        lambda_=lam,
    )
    mean = out.double().mean(0)
    expected = base_row.double() + lam * (w[0] * d_a.double() + w[1] * d_b.double())
    p_min = density - epsilon  # the largest variance any entry can have
    var = lam**2 * (w[0] ** 2 * d_a**2 + w[1] ** 2 * d_b**2).double() * (1 - p_min) / p_min
    assert ((mean - expected).abs() <= 5 * (var / rows).sqrt() + 1e-9).all(), mean - expected


def test_della_single_model_expectation_is_base_plus_lambda_delta():
    # One model agrees with its own sign; normalize divides wδ' by w: E = base + λδ.
    rows = 20_000
    delta_row = T(0.3, -1.2, 0.8, 2.0)
    out = call(
        "della",
        [delta_row.repeat(rows, 1)],
        torch.zeros(rows, 4),
        seed=4,
        weight=[0.3],
        density=[0.6],
        epsilon=[0.2],
        lambda_=2.0,
    )
    var = 4 * delta_row.double() ** 2 * (1 - 0.4) / 0.4
    err = (out.double().mean(0) - 2 * delta_row.double()).abs()
    assert (err <= 5 * (var / rows).sqrt()).all(), err


@pytest.mark.parametrize("name", DELLA)
def test_della_same_seed_same_output_different_seed_differs(name):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(20, 25, generator=g)
    fts = [base + torch.randn(20, 25, generator=g) for _ in range(2)]
    kw = dict(weight=[0.5, 0.5], density=[0.5, 0.5], epsilon=[0.2, 0.2])
    a = call(name, fts, base, seed=123, **kw)
    b = call(name, fts, base, seed=123, **kw)
    c = call(name, fts, base, seed=124, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------- DELLA: density ± epsilon bounds


@pytest.mark.parametrize(("density", "epsilon"), [(0.5, 0.6), (0.9, 0.15), (0.1, 0.15)])
def test_della_rejects_keep_rates_outside_zero_one(density, epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        call("della", [T(1, 2)], T(0, 0), weight=[1.0], density=[density], epsilon=[epsilon])


def test_della_accepts_keep_rates_touching_zero_and_one_and_density_one():
    call("della", [T(1, 2)], T(0, 0), weight=[1.0], density=[0.5], epsilon=[0.5])
    call("della", [T(1, 2)], T(0, 0), weight=[1.0], density=[0.7], epsilon=[0.3])
    # density 1 keeps everything; epsilon is not used, as in mergekit.
    out = call("della", [T(1, 2)], T(0, 0), weight=[1.0], density=[1.0], epsilon=[0.9])
    torch.testing.assert_close(out, T(1, 2))


_BAD = """
merge_method: della_linear
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, density: 0.9}
  - model: b
    parameters: {weight: 0.5, density: 0.5, epsilon: 0.4}
"""


def test_recipe_with_bad_density_and_epsilon_fails_validation():
    with pytest.raises(RecipeError) as err:
        parse_recipe(_BAD)
    assert [path for path, _ in err.value.problems] == ["models[0].parameters"]
    assert "use epsilon ≤ 0.1" in err.value.problems[0][1]
    # A global epsilon that fits both models passes.
    parse_recipe(_BAD.replace("density: 0.9}", "density: 0.9, epsilon: 0.05}"))


def test_gradient_density_with_bad_epsilon_fails_while_planning(llama, tmp_path):
    # A gradient is checked per tensor: only the deepest layers reach density 0.95.
    text = f"""
merge_method: della
base_model: {llama["base"]}
models:
  - model: {llama["ft_a"]}
    parameters: {{weight: 1.0, density: [0.3, 0.95], epsilon: 0.1}}
dtype: float32
"""
    recipe = parse_recipe(text)
    with pytest.raises(MergeError, match=r"density 0\.95 ± epsilon 0\.1 .* use epsilon ≤ 0\.05"):
        build_plan(recipe, tmp_path)


# -------------------------------------------------------------------- SCE: by hand

# Three task vectors over six entries (base 0).
_SCE = [T(1, 2, 0, 4, 1, -1), T(1, 0, 0, -2, 1, 3), T(1, 1, 3, 1, 1, 1)]


@pytest.mark.parametrize(
    ("topk", "expected"),
    [
        # Variances: e0 0, e1 2/3, e2 2, e3 6, e4 0, e5 8/3; four are nonzero.
        # 1/4 keeps e3 → δ₃ = 4, -2, 1; mean squares 16/6, 4/6, 1/6 → w ∝ 16, 4, 1;
        # sign(4 − 2 + 1) = + so models 1 and 3 survive: (16·4 + 1·1) / 17.
        (0.25, T(0, 0, 0, 65 / 17, 0, 0)),
        # 1/2 keeps e3, e5; mean squares 17/6, 13/6, 2/6 → w ∝ 17, 13, 2;
        # e3: + → (17·4 + 2·1)/19; e5: sign(-1 + 3 + 1) = + → (13·3 + 2·1)/15.
        (0.5, T(0, 0, 0, 70 / 19, 0, 41 / 15)),
        # ⌊3/4 · 4⌋ = 3 adds e2; mean squares 17/6, 13/6, 11/6 → w ∝ 17, 13, 11;
        # e2: only model 3 is nonzero (zeros never survive) → 3;
        # e3: (17·4 + 11·1)/28; e5: (13·3 + 11·1)/24.
        (0.75, T(0, 0, 3, 79 / 28, 0, 50 / 24)),
        # ⌊0.2 · 4⌋ = 0: nothing selected, the base stays.
        (0.2, T(0, 0, 0, 0, 0, 0)),
    ],
)
def test_sce_select_calculate_erase_by_hand(topk, expected):
    base = T(1, -1, 2, 0.5, 0, 3)
    out = call("sce", [base + d for d in _SCE], base, select_topk=topk)
    torch.testing.assert_close(out, base + expected)


def test_sce_without_selection_weights_by_mean_square():
    # mean squares 1 and 9 → w = 0.1, 0.9; all signs agree: 0.1·1 + 0.9·3 = 2.8.
    out = call("sce", [T(1, 1), T(3, 3)], T(0, 0))
    torch.testing.assert_close(out, T(2.8, 2.8))


def test_sce_elects_the_sign_from_unweighted_task_vectors():
    # Entry 0: 1 − 1.5 < 0, so model 2 survives although model 1's weight is far
    # larger (mean squares 50.5 and 1.125; a weighted vote would elect +).
    out = call("sce", [T(1, 10), T(-1.5, 0)], T(0, 0))
    torch.testing.assert_close(out, T(-1.5, 10))


def test_sce_equal_variances_are_selected_in_index_order():
    # Variances 1, 1, 0: one of two nonzero is kept, the first; both weights 1/2;
    # the vote 1 − 1 = 0 counts as +, so model 1's entry survives.
    out = call("sce", [T(1, 1, 0), T(-1, -1, 0)], T(0, 0, 0), select_topk=0.5)
    torch.testing.assert_close(out, T(1, 0, 0))


def test_sce_a_zero_task_vector_gets_no_weight():
    # δ = [1, -3] and [0, 0]: weights 1 and 0, and zeros never survive the vote.
    out = call("sce", [T(2, -2), T(1, 1)], T(1, 1))
    torch.testing.assert_close(out, T(2, -2))


# ----------------------------------------------------------- SCE: NumPy re-derivation


def _np_sce(tensors: list[np.ndarray], base: np.ndarray, topk: float) -> np.ndarray:
    deltas = np.stack([t.astype(np.float64) - base for t in tensors])
    if topk < 1:
        var = deltas.var(axis=0).reshape(-1)
        k = int(np.count_nonzero(var) * topk)
        order = np.argsort(-var, kind="stable")  # largest first, ties by index
        keep = np.zeros(var.size, dtype=bool)
        keep[order[:k]] = True
        deltas = deltas * keep.reshape(base.shape)
    energy = (deltas**2).reshape(len(tensors), -1).mean(axis=1)
    w = energy / energy.sum() if energy.sum() > 0 else np.full(len(tensors), 1 / len(tensors))
    sign = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(deltas) == sign
    w = w.reshape(-1, *([1] * base.ndim))
    num = (w * deltas * agree).sum(axis=0)
    den = (w * agree).sum(axis=0)
    return base + np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
def test_sce_matches_numpy_on_random_tensors(seed, topk):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(7, 9, generator=g)
    tensors = [base + 0.1 * torch.randn(7, 9, generator=g) for _ in range(3)]
    out = call("sce", tensors, base, select_topk=topk)
    expected = _np_sce([t.numpy() for t in tensors], base.numpy().astype(np.float64), topk)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("topk", [0.3, 0.6, 0.9])
def test_sce_matches_numpy_with_many_equal_entries(topk):
    # Small whole-number deltas of four models: many entries where all agree (variance
    # exactly 0) and many equal variances, all exact in float32 and float64.
    g = torch.Generator().manual_seed(10)
    base = torch.zeros(12, 10)
    tensors = [torch.randint(-2, 3, (12, 10), generator=g).float() for _ in range(4)]
    tensors[1][:6] = tensors[0][:6]
    tensors[2][:6] = tensors[0][:6]
    tensors[3][:3] = tensors[0][:3]
    out = call("sce", tensors, base, select_topk=topk)
    expected = _np_sce([t.numpy() for t in tensors], base.numpy().astype(np.float64), topk)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_sce_per_model_weight_is_a_warning_as_mergekit_ignores_it():
    text = """
merge_method: sce
base_model: base
models:
  - model: a
    parameters: {weight: 0.5}
  - model: b
"""
    warnings = dict(parse_recipe(text).warnings)
    assert "has no effect" in warnings["models[0].parameters.weight"]
    with pytest.raises(RecipeError, match="weight"):
        parse_recipe(text, strict=True)
