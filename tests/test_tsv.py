"""TSV-M and R-TSVM against formulas re-derived here with NumPy, plus the randomized
SVD kernel they lean on and a merge of each through the command line.

The references build the polar factor from the eigen form X(XᵀX)^(−1/2) or from
NumPy's SVD, never from weightops' kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_state, write_recipe
from typer.testing import CliRunner

from weightops import kernels
from weightops.cli import app
from weightops.merge import get_method
from weightops.merge.tsv import energy_ranks

# ---------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These matrices are small: extra BLAS / LAPACK threads only add synchronisation,
    # which on a busy machine costs far more than the work itself.
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def merge(name: str, deltas, base, **params) -> np.ndarray:
    """Run a method on base + deltas (NumPy in, NumPy out) with defaults for the rest."""
    spec = get_method(name)
    full = {p.name: p.default for p in spec.params.values()}
    full["weight"] = [1.0] * len(deltas)
    full.update({k.rstrip("_"): v for k, v in params.items()})
    b = torch.from_numpy(np.asarray(base, dtype=np.float32))
    tensors = [b + torch.from_numpy(np.asarray(d, dtype=np.float32)) for d in deltas]
    return spec(tensors, b.clone(), full).numpy()


def orthonormal(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((m, k)))[0]


def planted(rng, m: int, n: int, sigma) -> np.ndarray:
    """A matrix with singular values `sigma` and random singular vectors."""
    k = len(sigma)
    return orthonormal(rng, m, k) @ np.diag(sigma) @ orthonormal(rng, n, k).T


def inv_sqrt_polar(x: np.ndarray) -> np.ndarray:
    """X (XᵀX)^(−1/2) for a full-column-rank X, from the eigendecomposition of XᵀX."""
    evals, evecs = np.linalg.eigh(x.T @ x)
    return x @ (evecs / np.sqrt(evals)) @ evecs.T


def svd_polar(x: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def tsv_reference(deltas, k: int, weights=None, pad_to: int | None = None, polar=inv_sqrt_polar):
    """ΔM = polar(Û) diag(Ŝ) polar(V̂)ᵀ in float64, as written in the paper; with
    `pad_to`, Û / V̂ / Ŝ get zero columns up to that width (the unused slots)."""
    weights = weights or [1.0] * len(deltas)
    us, ss, vs = [], [], []
    for d, w in zip(deltas, weights, strict=True):
        u, s, vt = np.linalg.svd(np.asarray(d, dtype=np.float64), full_matrices=False)
        us.append(u[:, :k])
        ss.append(w * s[:k])
        vs.append(vt[:k].T)
    u_hat, s_hat, v_hat = np.hstack(us), np.concatenate(ss), np.hstack(vs)
    if pad_to is not None:
        extra = pad_to - len(s_hat)
        u_hat = np.hstack([u_hat, np.zeros((u_hat.shape[0], extra))])
        v_hat = np.hstack([v_hat, np.zeros((v_hat.shape[0], extra))])
        s_hat = np.concatenate([s_hat, np.zeros(extra)])
    return polar(u_hat) @ np.diag(s_hat) @ polar(v_hat).T


# ------------------------------------------------------------------------ TSV-M


def test_tsv_m_matches_the_dense_formula():
    rng = np.random.default_rng(0)
    m, n, t = 60, 45, 3  # r = 45, k = 15, Û is 60 × 45 with full column rank
    base = rng.standard_normal((m, n))
    deltas = [planted(rng, m, n, np.geomspace(3, 0.1, 40) * (i + 1)) for i in range(t)]
    for lam, weights in ((1.0, [1.0] * t), (0.7, [0.5, 1.0, 1.5])):
        out = merge("tsv_m", deltas, base, weight=weights, lambda_=lam, svd="full")
        expected = base + lam * tsv_reference(deltas, 15, weights)
        np.testing.assert_allclose(out, expected, rtol=0, atol=2e-4)


def test_tsv_m_unused_slots_match_the_zero_padded_formula():
    # T = 4 does not divide r = 45: k = 11, one slot of Û, Ŝ, V̂ stays zero. The
    # padded Û is rank deficient, so the reference takes the SVD form of the polar.
    rng = np.random.default_rng(1)
    m, n = 50, 45
    base = rng.standard_normal((m, n))
    deltas = [planted(rng, m, n, np.geomspace(2, 0.2, 30)) for _ in range(4)]
    out = merge("tsv_m", deltas, base, svd="full")
    expected = base + tsv_reference(deltas, 11, pad_to=45, polar=svd_polar)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-4)


def test_single_full_rank_task_returns_the_fine_tune():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((20, 30))
    delta = rng.standard_normal((20, 30))
    out = merge("tsv_m", [delta], base, svd="full")
    np.testing.assert_allclose(out, base + delta, rtol=0, atol=1e-5)


def test_tasks_in_disjoint_subspaces_merge_to_their_sum():
    # Each task is rank 2 inside its own block of rows and columns: the stacked singular
    # vectors are already orthonormal, so orthogonalising changes nothing.
    rng = np.random.default_rng(3)
    base = rng.standard_normal((30, 24))
    deltas = []
    for i in range(3):
        d = np.zeros((30, 24))
        d[10 * i : 10 * i + 10, 8 * i : 8 * i + 8] = planted(rng, 10, 8, [2.0, 0.5])
        deltas.append(d)
    out = merge("tsv_m", deltas, base, weight=[1.0, -0.5, 2.0], lambda_=0.8, svd="full")
    expected = base + 0.8 * (deltas[0] - 0.5 * deltas[1] + 2.0 * deltas[2])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 9)], ids=str)
def test_non_matrix_tensors_get_the_mean_task_vector(shape):
    # 1-D and 3-D tensors, and a matrix with fewer rows (2) than tasks (3).
    rng = np.random.default_rng(4)
    base = rng.standard_normal(shape)
    deltas = [rng.standard_normal(shape) for _ in range(3)]
    out = merge("tsv_m", deltas, base, weight=[1.0, 2.0, -1.0], lambda_=1.5)
    expected = base + 1.5 * (deltas[0] + 2 * deltas[1] - deltas[2]) / 3
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_unknown_svd_mode_is_an_error():
    with pytest.raises(ValueError, match="svd must be one of auto, full, truncated"):
        merge("tsv_m", [np.ones((4, 4))], np.zeros((4, 4)), svd="exact")


# ---------------------------------------------------------------- truncated SVD


def decaying_batch(rng, batch: int, m: int, n: int, decay: float) -> np.ndarray:
    r = min(m, n)
    return np.stack([planted(rng, m, n, decay ** np.arange(r)) for _ in range(batch)])


def test_kernel_truncated_svd_against_exact_svd():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(decaying_batch(rng, 3, 150, 100, 0.92)).float()
    k = 20
    u, s, vh = kernels.truncated_svd(x, k, generator=torch.Generator().manual_seed(0))
    _, s_exact, _ = kernels.svd(x)
    assert u.shape == (3, 150, k) and s.shape == (3, k) and vh.shape == (3, k, 100)
    eye = torch.eye(k).expand(3, k, k)
    torch.testing.assert_close(u.mT @ u, eye, rtol=0, atol=1e-4)
    torch.testing.assert_close(vh @ vh.mT, eye, rtol=0, atol=1e-4)
    tail = s_exact[:, k]  # σₖ₊₁
    # Halko et al.: the spectral error of the rank-k reconstruction stays within a
    # factor 3 of the best possible σₖ₊₁ (the kernel's stated bound).
    err = torch.linalg.matrix_norm(x - u @ torch.diag_embed(s) @ vh, ord=2)
    assert (err <= 3 * tail).all(), (err, tail)
    # Leading singular values: relative error of order (σₖ₊₁/σⱼ)^5 with two power
    # iterations; σ₁ … σ₁₀ here sit at ratio ≤ 0.92^11 ≈ 0.40 from σₖ₊₁.
    torch.testing.assert_close(s[:, :10], s_exact[:, :10], rtol=1e-3, atol=0)
    assert (s <= s_exact[:, :k] * (1 + 1e-5)).all()  # a projection never adds energy


@pytest.mark.parametrize(("m", "n", "t", "decay"), [(120, 90, 3, 0.95), (160, 80, 4, 0.97)])
def test_truncated_tsv_m_is_exact_tsv_m_of_near_optimal_low_rank_parts(m, n, t, decay):
    # The docstring's error statement: the truncated path is the exact formula applied
    # to randomized rank-k parts Aᵢ, each within 4·σₖ₊₁ of the best rank-k part.
    rng = np.random.default_rng(6)
    deltas = list(decaying_batch(rng, t, m, n, decay))
    k = min(m, n) // t
    approx = []
    for d in deltas:
        g = torch.Generator().manual_seed(0)
        u, s, vh = kernels.truncated_svd(torch.from_numpy(d).float(), k, generator=g)
        a = (u * s @ vh).double().numpy()
        uu, ss, vt = np.linalg.svd(d)
        best = uu[:, :k] * ss[:k] @ vt[:k]
        assert np.linalg.norm(a - best, 2) <= 4 * ss[k], (np.linalg.norm(a - best, 2), ss[k])
        approx.append(a)
    truncated = merge("tsv_m", deltas, np.zeros((m, n)), svd="truncated")
    np.testing.assert_allclose(truncated, tsv_reference(approx, k), rtol=0, atol=2e-4)
    # ... and it is not simply the exact path: the tails here are far from zero.
    full = merge("tsv_m", deltas, np.zeros((m, n)), svd="full")
    assert np.abs(truncated - full).max() > 1e-3


def test_truncated_path_is_deterministic():
    rng = np.random.default_rng(7)
    deltas = list(decaying_batch(rng, 4, 150, 100, 0.97))
    a = merge("tsv_m", deltas, np.zeros((150, 100)), svd="truncated")
    b = merge("tsv_m", deltas, np.zeros((150, 100)), svd="truncated")
    assert np.array_equal(a, b)


# ----------------------------------------------------------------------- R-TSVM


def test_r_tsvm_with_its_parts_off_is_tsv_m():
    rng = np.random.default_rng(8)
    base = rng.standard_normal((40, 36))
    deltas = [rng.standard_t(2, (40, 36)) * 0.1 for _ in range(3)]
    want = merge("tsv_m", deltas, base, lambda_=0.9, weight=[1.0, 0.5, 2.0])
    for off in ({"outlier_z": 0.0}, {"outlier_slope": 1.0}):
        got = merge("r_tsvm", deltas, base, lambda_=0.9, weight=[1.0, 0.5, 2.0], energy=0.0, **off)
        assert np.array_equal(got, want)
    # With damping on, the heavy-tailed deltas (Student t, 2 d.o.f.) do change.
    damped = merge("r_tsvm", deltas, base, lambda_=0.9, weight=[1.0, 0.5, 2.0], energy=0.0)
    assert not np.allclose(damped, want, atol=1e-3)


def expected_damping(delta: np.ndarray, z: float, slope: float) -> np.ndarray:
    mag = np.abs(delta)
    tau = z * 1.4826 * np.median(mag[mag > 0])
    return np.where(mag > tau, np.sign(delta) * (tau + slope * (mag - tau)), delta)


@pytest.mark.parametrize("slope", [0.0, 0.25])
def test_outlier_damping_changes_only_the_outliers(slope):
    rng = np.random.default_rng(9)
    delta = rng.standard_normal(1001) * 0.01  # odd count of non-zeros: one median
    delta[[5, 300, 777]] = [0.5, -0.8, 0.3]
    delta = np.concatenate([delta, np.zeros(200)])  # exact zeros do not lower the scale
    base = rng.standard_normal(delta.shape)
    out = merge("r_tsvm", [delta], base, outlier_z=4.0, outlier_slope=slope, energy=0.0)
    expected = expected_damping(delta, 4.0, slope)
    changed = expected != delta
    assert changed[[5, 300, 777]].all() and changed.sum() == 3
    np.testing.assert_allclose(out - base, expected, rtol=0, atol=1e-6)


def test_outlier_damping_on_a_matrix_single_task():
    # One full-rank task: TSV reproduces the (damped) delta, so what comes out is the
    # damping itself.
    rng = np.random.default_rng(10)
    delta = rng.standard_normal((25, 21)) * 0.01
    delta[3, 4], delta[20, 0] = 1.0, -0.6
    out = merge("r_tsvm", [delta], np.zeros(delta.shape), outlier_z=3.0, energy=0.0, svd="full")
    np.testing.assert_allclose(out, expected_damping(delta, 3.0, 0.0), rtol=0, atol=2e-5)


def test_energy_ranks_pick_the_planted_ranks():
    rng = np.random.default_rng(11)
    m, n = 80, 64  # r = 64, T = 3: share 21, cap 42
    ranks = (2, 5, 9)
    deltas = [planted(rng, m, n, rng.uniform(0.5, 3.0, k)) for k in ranks]
    deltas = [d + 1e-4 * rng.standard_normal((m, n)) for d in deltas]
    spectra = np.stack([np.linalg.svd(d, compute_uv=False)[:42] for d in deltas])
    totals = [float(np.sum(d**2)) for d in deltas]
    assert energy_ranks(torch.from_numpy(spectra), totals, 0.999, budget=64) == list(ranks)


def test_energy_ranks_fit_the_budget_by_relative_energy():
    # Task 0 holds its energy in 4 equal triplets (0.25 each); task 1 in 0.5, 0.3, 0.2;
    # task 2 is empty. energy = 1 asks for 4 + 3 = 7 slots, the budget is 4: each task
    # keeps one, then the largest shares, 0.3 (task 1) and 0.25 (task 0, index 1),
    # fill the rest.
    s = torch.tensor(
        [[0.5, 0.5, 0.5, 0.5], [0.5**0.5, 0.3**0.5, 0.2**0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )
    assert energy_ranks(s, [1.0, 1.0, 0.0], 1.0, budget=4) == [2, 2, 0]
    assert energy_ranks(s, [1.0, 1.0, 0.0], 1.0, budget=10) == [4, 3, 0]
    assert energy_ranks(s, [1.0, 1.0, 0.0], 0.75, budget=10) == [3, 2, 0]


def test_rank_selection_keeps_a_high_rank_task_whole():
    # Disjoint blocks: a rank-2 task and a rank-30 one, T = 2, r = 50. TSV-M gives each
    # 25 slots, cutting the second task's 5 weakest triplets; with rank selection the
    # first task takes 2 and the second all 30, so the merge is the exact sum.
    rng = np.random.default_rng(12)
    a, b = np.zeros((50, 50)), np.zeros((50, 50))
    a[:10, :10] = planted(rng, 10, 10, [3.0, 1.0])
    sigma_b = np.linspace(2.0, 1.0, 30)
    b[10:, 10:] = planted(rng, 40, 40, sigma_b)
    base = rng.standard_normal((50, 50))
    adaptive = merge("r_tsvm", [a, b], base, outlier_z=0.0, energy=0.999, svd="full")
    np.testing.assert_allclose(adaptive, base + a + b, rtol=0, atol=1e-5)
    fixed = merge("tsv_m", [a, b], base, svd="full")
    missing = np.linalg.norm(fixed - (base + a + b))
    np.testing.assert_allclose(missing, np.linalg.norm(sigma_b[25:]), rtol=1e-4)


# -------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("method", ["tsv_m", "r_tsvm"])
def test_cli_merge_on_the_llama_family(method, llama, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: {method}\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {llama['ft_a']}\n  - model: {llama['ft_b']}\n  - model: {llama['ft_c']}\n"
        "parameters:\n  lambda: 1.0\n  svd: full\n"
        + ("  outlier_z: 0.0\n  energy: 0.0\n" if method == "r_tsvm" else "")
        + "dtype: float32\n",
    )
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    merged = load_state(out)
    states = {k: load_state(v) for k, v in llama.items()}
    base = states["base"]
    assert set(merged) == set(base)
    fts = [states[k] for k in ("ft_a", "ft_b", "ft_c")]
    matrices = 0
    for name, b in base.items():
        deltas = [ft[name].double().numpy() - b.double().numpy() for ft in fts]
        got = merged[name].double().numpy()
        if b.dim() == 2 and min(b.shape) >= 3:
            matrices += 1
            expected = b.double().numpy() + tsv_reference(
                deltas, min(b.shape) // 3, pad_to=min(b.shape), polar=svd_polar
            )
        else:
            expected = b.double().numpy() + sum(deltas) / 3
        scale = max(1.0, np.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale, err_msg=name)
    assert matrices > 5


def test_unknown_svd_mode_in_a_recipe_fails_before_any_work(llama, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: tsv_m\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {llama['ft_a']}\n  - model: {llama['ft_b']}\n"
        "parameters:\n  svd: exact\n",
    )
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(out)])
    assert result.exit_code == 1
    assert "parameters.svd: svd must be one of auto, full, truncated" in result.output
    assert not out.exists()
