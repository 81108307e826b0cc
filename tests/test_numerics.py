"""Numerics: the default (fp32 compute) against fp64 references, and `--numerics mergekit`.

In the default numerics every deterministic method, given bf16 inputs, must land within
one bf16 ulp of its formula evaluated in fp64 here with numpy (a correctly rounded
result is within half an ulp; fp32 intermediates may cost the other half). The
mergekit numerics are checked bit for bit against mergekit itself by
bench/mergekit_parity.py; here, against hand-worked bf16 cases and through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_state, write_recipe
from typer.testing import CliRunner

from weightops.cli import app
from weightops.merge import all_methods, get_method
from weightops.merge.registry import numerics_variants

SHAPE = (48, 40)


def _inputs(n: int, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16 base and n bf16 fine-tunes of it (small dense deltas, a few large)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(SHAPE, generator=g) * 0.02 * scale).bfloat16()
    fts = []
    for _ in range(n):
        delta = torch.randn(SHAPE, generator=g) * 0.002
        delta += (torch.rand(SHAPE, generator=g) < 0.05) * torch.randn(SHAPE, generator=g) * 0.01
        fts.append((base.float() + delta * scale).bfloat16())
    return base, fts


def _run(method: str, base: torch.Tensor | None, fts: list[torch.Tensor], params: dict):
    """The method as the engine runs it by default: fp32 in, bf16 out."""
    spec = get_method(method)
    full = {k: s.default for k, s in spec.params.items()}
    full.update(params)
    for k, s in spec.params.items():
        if s.per_model and not isinstance(full[k], list):
            full[k] = [full[k]] * len(fts)
    b = base.float() if base is not None else None
    return spec([t.float() for t in fts], b, full).bfloat16()


def _ulps(out: torch.Tensor, ref: np.ndarray) -> float:
    """Largest |out − ref| in bf16 ulps at |ref| (8 significant bits)."""
    r = np.abs(ref)
    exponent = np.floor(np.log2(np.maximum(r, 2.0**-126)))
    ulp = 2.0 ** (exponent - 7)
    return float((np.abs(out.double().numpy() - ref) / ulp).max())


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def _trim(delta: np.ndarray, density: float) -> np.ndarray:
    flat = delta.ravel().copy()
    k = int(density * flat.size)
    order = np.argsort(-np.abs(flat), kind="stable")
    flat[order[k:]] = 0
    return flat.reshape(delta.shape)


def _outliers(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    flat = delta.ravel().copy()
    n = flat.size
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = np.argsort(np.abs(flat), kind="stable")
    flat[order[:bottom]] = 0
    flat[order[bottom + keep :]] = 0
    return flat.reshape(delta.shape)


def _ties_combine(base: np.ndarray, deltas: list[np.ndarray], w: list[float]) -> np.ndarray:
    weighted = [wi * d for wi, d in zip(w, deltas, strict=True)]
    elected = np.where(sum(weighted) >= 0, 1.0, -1.0)
    agree = [np.sign(u) == elected for u in weighted]
    mixed = sum(u * a for u, a in zip(weighted, agree, strict=True))
    divisor = sum(wi * a for wi, a in zip(w, agree, strict=True))
    return base + mixed / np.where(divisor == 0, 1.0, divisor)


def _slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    ua, ub = a.ravel() / np.linalg.norm(a), b.ravel() / np.linalg.norm(b)
    omega = np.arccos(np.clip(ua @ ub, -1, 1))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def _model_stock(base: np.ndarray, fts: list[np.ndarray]) -> np.ndarray:
    d = [f.ravel() - base.ravel() for f in fts]
    k = len(d)
    cos = np.mean(
        [
            d[i] @ d[j] / (np.linalg.norm(d[i]) * np.linalg.norm(d[j]))
            for i in range(k)
            for j in range(i + 1, k)
        ]
    )
    t = k * cos / (1 + (k - 1) * cos)
    return t * np.mean(fts, axis=0) + (1 - t) * base


# Weights exact in binary: where Σ wᵢδᵢ is exactly 0 the TIES election is decided by
# how the weights themselves round (0.6 in fp32 and in fp64 differ), which no
# precision fixes; with exact weights both arithmetics see the same sum.
W = [0.5, 0.25, 0.75]
# RAM's activity threshold, binary-exact for the same reason: a delta (a difference of
# two bf16 numbers, exact in fp32) equal to it must compare the same in both.
RAM_EPS = 2.0**-10


def _reference(case: str, base: np.ndarray, fts: list[np.ndarray]) -> np.ndarray:
    deltas = [f - base for f in fts]
    method = case.split("/")[0]
    if method == "linear":
        return sum(w * f for w, f in zip(W, fts, strict=False)) / sum(W[: len(fts)])
    if method == "task_arithmetic":
        return base + 0.8 * sum(w * d for w, d in zip(W, deltas, strict=False))
    if method == "ties":
        return _ties_combine(base, [_trim(d, 0.3) for d in deltas], W[: len(fts)])
    if method == "breadcrumbs":
        kept = [_outliers(d, 0.8, 0.05) for d in deltas]
        return base + sum(w * d for w, d in zip(W, kept, strict=False))
    if method == "breadcrumbs_ties":
        return base + _ties_unnormalized([_outliers(d, 0.8, 0.05) for d in deltas])
    if method == "slerp":
        return _slerp(base, fts[0], 0.3)
    if method == "model_stock":
        return _model_stock(base, fts)
    if method == "passthrough":
        return 0.5 * fts[0]
    if method == "sce":
        return base + _sce(deltas, 0.5)
    if method == "nuslerp":
        return _nuslerp(case, base, fts, 0.75 / (0.25 + 0.75))
    if method == "multislerp":
        if case.endswith("/base"):
            return base + _multislerp(deltas)
        return _multislerp(fts)
    if method == "karcher":
        return _karcher(fts)
    if method == "nearswap":
        w = np.clip(1e-3 / np.maximum(np.abs(fts[0] - base), 1e-6), 0, 1)
        return w * fts[0] + (1 - w) * base
    if method == "arcee_fusion":
        return _arcee_fusion(base, fts[0])
    if method in ("ram", "ramplus_tl"):
        return base + _ram(deltas, method == "ramplus_tl", r=0.1, alpha=0.2)
    if method == "r_tsvm":
        damped = [_damp(d, 3.0) for d in deltas]
        return base + _tsv(damped, _energy_ranks(damped, 0.9))
    if method == "tsv_m":
        return base + _tsv(deltas, [min(d.shape) // len(deltas) for d in deltas])
    if method == "model_averaging":
        return 0.25 * base + 0.75 * fts[0]
    raise AssertionError(method)


def _ties_unnormalized(deltas: list[np.ndarray]) -> np.ndarray:
    weighted = [w * d for w, d in zip(W, deltas, strict=False)]
    elected = np.where(sum(weighted) >= 0, 1.0, -1.0)
    return sum(u * (np.sign(u) == elected) for u in weighted)


def _sce(deltas: list[np.ndarray], topk: float) -> np.ndarray:
    var = np.var(deltas, axis=0)
    k = int(np.count_nonzero(var) * topk)
    order = np.argsort(-var.ravel(), kind="stable")
    # Bf16 deltas repeat, so variances equal in exact arithmetic are common; if such a
    # tie straddled the cut, fp32 and fp64 rounding would each break it their own way.
    # fp32 variances are good to a few 1e-7 relative, so a wider gap decides alike.
    kth, next_ = var.ravel()[order[k - 1]], var.ravel()[order[k]]
    assert kth - next_ > 1e-5 * kth, "inputs with a variance tie at the SCE cut"
    keep = np.zeros(var.size, dtype=bool)
    keep[order[:k]] = True
    sel = [d * keep.reshape(var.shape) for d in deltas]
    energy = [np.mean(d**2) for d in sel]
    w = [e / sum(energy) for e in energy]
    elected = np.where(sum(sel) >= 0, 1.0, -1.0)
    agree = [(np.sign(d) == elected) for d in sel]
    num = sum(wi * a * d for wi, a, d in zip(w, agree, sel, strict=True))
    den = sum(wi * a for wi, a in zip(w, agree, strict=True))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _slerp_rows(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """SLERP of every row of a with the same row of b (none nearly parallel here)."""
    cos = np.sum(a * b, axis=-1, keepdims=True)
    cos /= np.linalg.norm(a, axis=-1, keepdims=True) * np.linalg.norm(b, axis=-1, keepdims=True)
    omega = np.arccos(cos)
    assert np.abs(cos).max() < 0.9995  # the linear fallback is not under test here
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def _nuslerp(case: str, base: np.ndarray, fts: list[np.ndarray], t: float) -> np.ndarray:
    with_base = "/base" in case
    a, b = (f - base for f in fts) if with_base else fts
    if case.endswith("/flat"):
        out = _slerp_rows(a.reshape(1, -1), b.reshape(1, -1), t).reshape(a.shape)
    elif case.endswith("/columns"):  # nuslerp_row_wise: the vectors along dim 0
        out = _slerp_rows(a.T, b.T, t).T
    else:
        out = _slerp_rows(a, b, t)
    return base + out if with_base else out


def _multislerp(xs: list[np.ndarray]) -> np.ndarray:
    w = np.array(W[: len(xs)]) / sum(W[: len(xs)])
    norms = [np.linalg.norm(x) for x in xs]
    m = sum(wi * x / (n + 1e-8) for wi, x, n in zip(w, xs, norms, strict=True))
    return sum(wi * n for wi, n in zip(w, norms, strict=True)) * m / np.linalg.norm(m)


def _karcher(xs: list[np.ndarray]) -> np.ndarray:
    """The Riemannian mean direction, iterated to fp64 convergence, times the mean norm."""
    norms = [np.linalg.norm(x) for x in xs]
    units = [x.ravel() / n for x, n in zip(xs, norms, strict=True)]
    u = sum(units) / np.linalg.norm(sum(units))
    for _ in range(200):
        step = np.zeros_like(u)
        for ui in units:
            theta = np.arccos(np.clip(u @ ui, -1, 1))
            step += theta / np.sin(theta) * (ui - (u @ ui) * u) / len(units)
        size = np.linalg.norm(step)
        if size < 1e-15:
            break
        u = np.cos(size) * u + np.sin(size) * step / size
        u /= np.linalg.norm(u)
    return (np.mean(norms) * u).reshape(xs[0].shape)


def _arcee_fusion(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True) + 1e-8

    p, q = softmax(other), softmax(base)
    score = np.abs(other - base) * np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    ranked = np.sort(score.ravel())
    last = ranked.size - 1
    fence = ranked[last // 2] + 1.5 * (ranked[3 * last // 4] - ranked[last // 4])
    # fp32 scores carry ≤ 6e-5 relative error here (see INPUT_SCALE), the fence made of
    # three of them a few times that; a score closer to it could land on either side.
    assert np.abs(score - fence).min() > 3e-4 * fence, "inputs with a score at the fence"
    return base + (score >= fence) * (other - base)


def _ram(deltas: list[np.ndarray], plus: bool, r: float, alpha: float) -> np.ndarray:
    active = [np.abs(d) > RAM_EPS for d in deltas]
    c = sum(a.astype(float) for a in active)
    out = sum(a * d for a, d in zip(active, deltas, strict=True)) / np.maximum(c, 1)
    if plus:
        for a, d in zip(active, deltas, strict=True):
            unique, shared = np.sum(a & (c == 1)), np.sum(a & (c > 1))
            if unique:
                lam = 1 + r * np.clip(shared / max(unique, RAM_EPS), 0, alpha)
                out += (lam - 1) * a * (c == 1) * d  # λᵢδᵢ where c = 1, δᵢ/c elsewhere
    return out


def _polar(x: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def _tsv(deltas: list[np.ndarray], ranks: list[int]) -> np.ndarray:
    parts = [np.linalg.svd(d, full_matrices=False) for d in deltas]
    u = np.concatenate([p[0][:, :k] for p, k in zip(parts, ranks, strict=True)], axis=1)
    s = np.concatenate([w * p[1][:k] for p, k, w in zip(parts, ranks, W, strict=False)])
    vt = np.concatenate([p[2][:k] for p, k in zip(parts, ranks, strict=True)], axis=0)
    return _polar(u) * s @ _polar(vt)


def _damp(delta: np.ndarray, z: float) -> np.ndarray:
    mag = np.sort(np.abs(delta[delta != 0]))
    tau = z * 1.4826 * mag[mag.size // 2]  # the upper median
    return np.sign(delta) * np.minimum(np.abs(delta), tau)


def _energy_ranks(deltas: list[np.ndarray], energy: float) -> list[int]:
    r = min(deltas[0].shape)
    rel = [np.linalg.svd(d, compute_uv=False) ** 2 / np.sum(d**2) for d in deltas]
    cap = min(r, 2 * (r // len(deltas)))
    ranks = [min(cap, int(np.searchsorted(np.cumsum(x), energy)) + 1) for x in rel]
    if sum(ranks) <= r:
        return ranks
    # The first triplet of each task, then the largest shares of their own task's energy.
    extra = sorted((-x[j], j, i) for i, x in enumerate(rel) for j in range(1, ranks[i]))
    chosen = [1] * len(deltas)
    for _, _, i in extra[: r - len(deltas)]:
        chosen[i] += 1
    return chosen


# Arcee Fusion's row KL divergence of two nearly equal softmaxes is a sum of terms far
# larger than the result (Σ p·log(p/q) with Σp = Σq): for the usual deltas of ~1e-3
# fp32 leaves it with ~9% error, enough to move scores across the fence. Logits of
# std 1 and deltas of ~0.1 bring that to ≤ 6e-5, so the selection is the fp64 one.
INPUT_SCALE = {"arcee_fusion": 50.0}

CASES = {
    # case (method, then variant): (uses base, number of fine-tunes, parameters)
    "linear": (False, 3, {"weight": W}),
    "task_arithmetic": (True, 3, {"weight": W, "lambda": 0.8}),
    "ties": (True, 3, {"weight": W, "density": 0.3}),
    "breadcrumbs": (True, 3, {"weight": W, "density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties": (True, 3, {"weight": W, "density": 0.8, "gamma": 0.05}),
    "slerp": (True, 1, {"t": 0.3}),
    "model_stock": (True, 3, {}),
    "passthrough": (False, 1, {"scale": 0.5}),
    "sce": (True, 3, {"select_topk": 0.5}),
    "nuslerp/base/flat": (True, 2, {"weight": [0.25, 0.75]}),
    "nuslerp/base/columns": (
        True,
        2,
        {"weight": [0.25, 0.75], "nuslerp_flatten": False, "nuslerp_row_wise": True},
    ),
    "nuslerp/flat": (False, 2, {"weight": [0.25, 0.75]}),
    "nuslerp/rows": (False, 2, {"weight": [0.25, 0.75], "nuslerp_flatten": False}),
    "multislerp/base": (True, 3, {"weight": W}),
    "multislerp": (False, 3, {"weight": W}),
    # The default tol (1e-5) stops the iteration with steps still far above fp32
    # resolution (4.1 ulps off here); 1e-7 lets it run until the step is rounding noise.
    "karcher": (False, 3, {"tol": 1e-7}),
    "nearswap": (True, 1, {"t": 1e-3}),
    "arcee_fusion": (True, 1, {}),
    "ram": (True, 3, {"epsilon": RAM_EPS}),
    "ramplus_tl": (True, 3, {"epsilon": RAM_EPS, "r": 0.1, "alpha": 0.2}),
    # An fp32 SVD is accurate normwise (here to 2e-6 … 7e-6 of the update's largest entry),
    # not entry by entry: where θ_base and the update cancel to |θ| ≲ 1e-6 its error
    # exceeds half a bf16 ulp of θ (other seeds of _inputs give up to 3.6 ulps for
    # tsv_m and 2.1 for r_tsvm there). The smallest |θ| of these inputs is ~5e-6.
    "tsv_m": (True, 3, {"weight": W}),
    "r_tsvm": (True, 3, {"weight": W, "outlier_z": 3.0, "outlier_slope": 0.0, "energy": 0.9}),
    "model_averaging": (True, 1, {"alpha": 0.25}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_numerics_within_one_ulp_of_fp64(case: str) -> None:
    uses_base, n, params = CASES[case]
    base, fts = _inputs(n, scale=INPUT_SCALE.get(case, 1.0))
    params = {k: (v[:n] if isinstance(v, list) else v) for k, v in params.items()}
    out = _run(case.split("/")[0], base if uses_base else None, fts, params)
    ref = _reference(case, _np(base), [_np(f) for f in fts])
    assert out.dtype == torch.bfloat16
    assert _ulps(out, ref) <= 1.0


def _mergekit(method: str, base, fts, params: dict) -> torch.Tensor:
    spec = get_method(method)
    full = {k: s.default for k, s in spec.params.items()} | params
    return spec(
        [t.clone() for t in fts],
        base.clone() if base is not None else None,
        full,
        numerics="mergekit",
    )


def test_mergekit_linear_rounds_each_product_to_the_dtype() -> None:
    # 1 + 2⁻⁸ is not a bf16 number: mergekit rounds 0.5·(1 + 2⁻⁷) = 0.5 + 2⁻⁸ exactly,
    # but 0.3 is rounded to bf16 (0.30078125) before multiplying, and each product is
    # rounded to bf16 before the sum.
    a = torch.tensor([1 + 2.0**-7], dtype=torch.bfloat16)
    b = torch.tensor([1.0], dtype=torch.bfloat16)
    out = _mergekit("linear", None, [a, b], {"weight": [0.3, 0.7], "normalize": False})
    w0, w1 = torch.tensor(0.3).bfloat16(), torch.tensor(0.7).bfloat16()
    expected = ((a * w0) + (b * w1)).item()  # two bf16 products, an exact fp32 sum
    assert out.dtype == torch.bfloat16
    assert out.item() == torch.tensor(expected).bfloat16().item()


def test_mergekit_breadcrumbs_without_outliers_drops_the_whole_task_vector() -> None:
    # 20 entries, gamma 0.01: ⌊0.2⌋ = 0 outliers; mergekit's kept range is then empty.
    base = torch.zeros(20, dtype=torch.bfloat16)
    ft = torch.arange(1, 21, dtype=torch.bfloat16)
    out = _mergekit("breadcrumbs", base, [ft], {"weight": [1.0], "density": [0.5], "gamma": [0.01]})
    assert torch.equal(out, base)
    default = get_method("breadcrumbs")(
        [ft.float()], base.float(), {"weight": [1.0], "density": [0.5], "gamma": [0.01]}
    )
    assert int(torch.count_nonzero(default)) == 10


def test_mergekit_ties_elects_and_divides_in_the_dtype() -> None:
    base = torch.zeros(4, dtype=torch.bfloat16)
    a = torch.tensor([1.0, -2.0, 3.0, 0.0], dtype=torch.bfloat16)
    b = torch.tensor([-3.0, 1.0, 1.0, 0.0], dtype=torch.bfloat16)
    out = _mergekit("ties", base, [a, b], {"weight": [1.0, 1.0], "density": [1.0, 1.0]})
    # signs of the sums: -, -, +, + (0 counts as +); agreeing entries averaged.
    assert out.tolist() == [-3.0, -2.0, 2.0, 0.0]


def test_cli_numerics_mergekit(llama: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {llama['ft_a']}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {llama['ft_b']}\n    parameters: {{weight: 0.4, density: 0.5}}\n"
        "dtype: bfloat16\n",
    )
    runner = CliRunner()
    outs = {}
    for numerics in ("default", "mergekit"):
        out = tmp_path / numerics
        res = runner.invoke(app, ["merge", str(recipe), "-o", str(out), "--numerics", numerics])
        assert res.exit_code == 0, res.output
        outs[numerics] = load_state(out)
    close = total = 0
    differs = False
    for name, t in outs["mergekit"].items():
        assert t.dtype == torch.bfloat16
        d = outs["default"][name]
        # bf16 arithmetic and fp32 arithmetic rounded once agree to a few bf16 ulps
        # almost everywhere; entries tied at the trim threshold or near cancellation
        # may part further. The bench compares with mergekit itself bit for bit.
        close += int(((t.float() - d.float()).abs() <= 2**-6 * d.float().abs() + 1e-6).sum())
        total += t.numel()
        differs |= not torch.equal(t, d)
    assert differs
    assert close / total > 0.9


def test_cli_numerics_refused_without_a_variant(llama: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: tsv_m\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {llama['ft_a']}\n  - model: {llama['ft_b']}\n",
    )
    res = CliRunner().invoke(
        app, ["merge", str(recipe), "-o", str(tmp_path / "o"), "--numerics", "mergekit"]
    )
    assert res.exit_code != 0
    assert "no mergekit numerics" in res.output


def test_every_mergekit_variant_takes_its_methods_parameters() -> None:
    import inspect

    def keywords(fn) -> set[str]:
        return {
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    variants = numerics_variants()
    assert {m for m, _ in variants} >= {
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
        "sce",
        "nuslerp",
        "multislerp",
        "karcher",
        "nearswap",
        "arcee_fusion",
        "della",
        "della_linear",
    }
    for (method, numerics), fn in variants.items():
        assert numerics == "mergekit"
        # Row-block cuts are found and passed under the default numerics only: mergekit's
        # tie order comes from its own sort of the whole tensor.
        assert keywords(fn) == keywords(all_methods()[method].fn) - {"cuts"}, method


def test_mergekit_numerics_do_not_depend_on_row_blocks(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    # Elementwise methods run on row blocks of large tensors; in bf16 arithmetic each
    # entry must still see exactly the operations it sees when the tensor is whole.
    from weightops.engine.plan import build_plan
    from weightops.engine.run import RunOptions, execute
    from weightops.recipe import load_recipe

    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: task_arithmetic\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {llama['ft_a']}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {llama['ft_b']}\n    parameters: {{weight: 0.3}}\n"
        "parameters: {normalize: true, lambda: 0.9}\ndtype: bfloat16\n",
    )
    outs = {}
    for chunk in (64, 1 << 20):
        plan = build_plan(load_recipe(recipe), tmp_path, numerics="mergekit")
        out = tmp_path / f"out{chunk}"
        execute(plan, out, RunOptions(device="cpu", progress=False, chunk_elements=chunk))
        outs[chunk] = load_state(out)
    for name, t in outs[64].items():
        assert torch.equal(t, outs[1 << 20][name]), name
