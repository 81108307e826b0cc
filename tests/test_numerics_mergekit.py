"""`--numerics mergekit` of the methods with no closed task-vector form: sce, nuslerp,
multislerp, karcher, nearswap, arcee_fusion and the della pair.

Each variant is checked against mergekit's formula worked here by hand or in numpy on
bf16 inputs: bit for bit where the steps are few enough to round by hand (each bf16
operation is an fp32 one rounded to bf16), within a few bf16 ulps of the fp64 formula
where they are not. bench/mergekit_parity.py compares with mergekit itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_state, write_recipe
from typer.testing import CliRunner

from weightops.cli import app
from weightops.merge import get_method


def _mergekit(method: str, base, fts, params: dict, rng=None) -> torch.Tensor:
    spec = get_method(method)
    full = {k: s.default for k, s in spec.params.items()} | params
    return spec(
        [t.clone() for t in fts],
        base.clone() if base is not None else None,
        full,
        rng=rng,
        numerics="mergekit",
    )


def _bf16(x) -> np.ndarray:
    """Round fp32 values to the nearest bf16 (ties to even), kept as fp32."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    # numpy scalars of the same type: numpy 1.x promotes uint64 with a Python int to float.
    u = np.uint64
    bits = (bits + u(0x7FFF) + ((bits >> u(16)) & u(1))) & u(0xFFFF0000)
    return bits.astype(np.uint32).view(np.float32)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bfloat16)


def _close(out: torch.Tensor, ref: np.ndarray, share: float = 2**-6) -> None:
    """Within `share` of the largest |ref| everywhere (bf16 steps cost a few ulps each)."""
    err = np.abs(out.double().numpy() - ref).max()
    assert err <= share * np.abs(ref).max(), err


def test_nearswap_rounds_each_step_to_bf16() -> None:
    base = _t([0.5, 1.0, -0.25, 2.0, 0.125, 3.0])
    other = _t([0.53125, 1.5, -0.25, -1.0, 0.1171875, 3.0078125])
    t = 0.0625
    a, b = base.float().numpy(), other.float().numpy()
    diff = np.maximum(np.abs(_bf16(a - b)), _bf16(1e-6))
    # t / x is evaluated as reciprocal(x) · t, each rounded.
    w = np.clip(_bf16(_bf16(1 / diff) * np.float32(t)), 0, 1)
    expected = _bf16(_bf16(w * b) + _bf16(_bf16(1 - w) * a))
    out = _mergekit("nearswap", base, [other], {"t": t})
    assert out.dtype == torch.bfloat16
    assert out.float().numpy().tolist() == expected.tolist()


def test_sce_takes_equal_weights_when_the_task_vectors_are_tiny() -> None:
    # mean(δ²) is 7.5·2⁻²⁴ and 6.75·2⁻²⁴, summing to under 1e-6: mergekit then weighs
    # both models ½, so agreeing entries are averaged and a lone agreeing one kept.
    s = 2.0**-12
    base = torch.zeros(4, dtype=torch.bfloat16)
    a, b = _t([s, 2 * s, -3 * s, 4 * s]), _t([3 * s, -s, -s, 4 * s])
    out = _mergekit("sce", base, [a, b], {})
    assert out.tolist() == [2 * s, 2 * s, -2 * s, 4 * s]
    default = get_method("sce")([a.float(), b.float()], base.float(), {"select_topk": 1.0})
    assert default[0].item() != 2 * s  # the formula's weights, 7.5 : 6.75


def test_sce_selects_by_variance_and_floors_the_divisor() -> None:
    # Variances across the two models (((a − b)/2)²): 0, 1, 4, 1/16; three are nonzero
    # and ⌊3 · 0.5⌋ = 1 is kept, entry 2. There δ = ±2 sum to 0 (counted +), so only
    # a's 2 survives; elsewhere nothing survives and 0 / max(0, 1e-6) = 0.
    base = torch.zeros(4, dtype=torch.bfloat16)
    a, b = _t([1.0, 0.0, 2.0, 0.5]), _t([1.0, 2.0, -2.0, 0.0])
    out = _mergekit("sce", base, [a, b], {"select_topk": 0.5})
    assert out.tolist() == [0.0, 0.0, 2.0, 0.0]


def _slerp64(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    omega = np.arccos(np.clip(ua @ ub, -1, 1))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_per_vector_with_base(row_wise: bool) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 10, generator=g).bfloat16()
    a = (base.float() + torch.randn(6, 10, generator=g)).bfloat16()
    b = (base.float() + torch.randn(6, 10, generator=g)).bfloat16()
    out = _mergekit(
        "nuslerp",
        base,
        [a, b],
        {"weight": [0.6, 0.4], "nuslerp_flatten": False, "nuslerp_row_wise": row_wise},
    )
    da, db = a.double().numpy() - base.double().numpy(), b.double().numpy() - base.double().numpy()
    if row_wise:  # the vectors along the first dimension (the columns)
        delta = np.stack([_slerp64(0.4, da[:, j], db[:, j]) for j in range(10)], axis=1)
    else:
        delta = np.stack([_slerp64(0.4, da[i], db[i]) for i in range(6)])
    assert out.dtype == torch.bfloat16
    _close(out - base, delta, share=2**-5)


def test_nuslerp_interpolates_linearly_only_when_sin_omega_vanishes() -> None:
    # Antiparallel in bf16: Ω = bf16(π) = 3.140625, whose sine is ≈ 9.7e-4, far above
    # mergekit's 1e-8, so the spherical formula divides by it (the default numerics
    # interpolate linearly below |cos Ω| > 0.9995 and give 0.5·a here).
    a = _t([1.0, 2.0])
    out = _mergekit("nuslerp", None, [a, -a], {"weight": [0.75, 0.25]})
    theta = _bf16(np.arccos(np.float32(-1)))
    sin = _bf16(np.sin(theta))
    c0 = _bf16(np.sin(_bf16(np.float32(0.75) * theta)))
    c1 = _bf16(np.sin(_bf16(np.float32(0.25) * theta)))
    x = a.float().numpy()
    expected = _bf16(_bf16(_bf16(c0 * x) + _bf16(c1 * -x)) / sin)
    assert out.float().numpy().tolist() == expected.tolist()
    assert out.tolist() != [0.5, 1.0]
    # Exactly parallel: Ω = 0 and the linear blend.
    same = _mergekit("nuslerp", None, [a, a * 2], {"weight": [0.5, 0.5]})
    assert same.tolist() == [1.5, 3.0]


def test_multislerp_blends_directions_and_norms() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(32, generator=g).bfloat16()
    fts = [(base.float() + torch.randn(32, generator=g)).bfloat16() for _ in range(3)]
    w = np.array([0.5, 0.3, 0.2])
    out = _mergekit("multislerp", base, fts, {"weight": [1.0, 0.6, 0.4]})
    x = [f.double().numpy() - base.double().numpy() for f in fts]
    norms = np.array([np.linalg.norm(v) for v in x])
    mean = sum(wi * v / ni for wi, v, ni in zip(w, x, norms, strict=True))
    delta = (w @ norms) * mean / np.linalg.norm(mean)
    _close(out - base, delta)


def test_multislerp_two_cancelling_inputs_blend_linearly() -> None:
    base = _t([0.5, -1.0])
    a = _t([1.5, 1.0])
    b = _t([-0.5, -3.0])  # b − base = −(a − base)
    out = _mergekit("multislerp", base, [a, b], {"weight": [1.0, 1.0]})
    assert out.tolist() == base.tolist()
    with pytest.raises(ValueError, match="cancel"):
        _mergekit("multislerp", base, [a, b, a], {"weight": [1.0, 2.0, 1.0]})


def _karcher64(xs: list[np.ndarray], iters: int = 50) -> np.ndarray:
    units = [x / np.linalg.norm(x) for x in xs]
    u = sum(units) / np.linalg.norm(sum(units))
    for _ in range(iters):
        step = np.zeros_like(u)
        for v in units:
            c = np.clip(u @ v, -1, 1)
            th = np.arccos(c)
            if th > 1e-12:
                step += th / np.sin(th) * (v - c * u) / len(units)
        n = np.linalg.norm(step)
        if n < 1e-12:
            break
        u = np.cos(n) * u + np.sin(n) * step / n
        u /= np.linalg.norm(u)
    return np.mean([np.linalg.norm(x) for x in xs]) * u


def test_karcher_follows_the_riemannian_mean() -> None:
    g = torch.Generator().manual_seed(3)
    xs = [(torch.randn(40, generator=g) * s).bfloat16() for s in (1.0, 2.0, 0.5)]
    out = _mergekit("karcher", None, xs, {"max_iter": 10, "tol": 1e-5})
    assert out.dtype == torch.bfloat16
    _close(out, _karcher64([x.double().numpy() for x in xs]))


def test_karcher_counts_a_zero_input_in_the_norm_only() -> None:
    a, b, zero = _t([2.0, 0.0]), _t([0.0, 2.0]), _t([0.0, 0.0])
    out = _mergekit("karcher", None, [a, b, zero], {})
    # u = bf16(½·a/2 + ½·b/2) / ‖·‖ = bf16(0.5/0.7071068); the step is 0 by symmetry;
    # the scale is (2 + 2 + 0)/3.
    u = _bf16(np.float32(0.5) / np.float32(np.sqrt(0.5)))
    expected = _bf16(np.float32(2 / 3 + 2 / 3) * u)
    assert out.tolist() == [float(expected)] * 2


def test_arcee_fusion_keeps_outlying_changes_in_fp32() -> None:
    # One row: every score is |δ|·KL, so the fence follows |δ| = [1,1,2,2,3,3,4,4,16]/16:
    # Q1, Q2, Q3 are the entries of rank 2, 4, 6: 2s, 3s, 4s, and the fence 3s + 1.5·2s
    # = 6s keeps the 16 only.
    base = torch.zeros(9, dtype=torch.bfloat16)
    other = _t([1, -1, 2, 2, -3, 3, 4, 4, 16]) / 16
    out = _mergekit("arcee_fusion", base, [other], {})
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0] * 8 + [1.0]


def test_della_refuses_keep_rates_touching_zero_or_one() -> None:
    base = torch.zeros(8, dtype=torch.bfloat16)
    ft = torch.arange(1, 9, dtype=torch.bfloat16)
    params = {"weight": [1.0], "density": [0.5], "epsilon": [0.5]}
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        _mergekit("della", base, [ft], params, rng=torch.Generator().manual_seed(0))


def test_della_rescales_to_the_l1_norm_and_keeps_large_entries_more_often() -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.zeros(200, 500, dtype=torch.bfloat16)
    delta = (torch.rand(200, 500, generator=g) + 0.5).bfloat16()
    params = {"weight": [1.0], "density": [0.5], "epsilon": [0.4]}
    out = _mergekit("della_linear", base, [delta], params, rng=torch.Generator().manual_seed(0))
    kept = out != 0
    # One factor for the whole tensor: the L1 norm before over the one after the mask.
    factor = delta.double().abs().sum() / (delta.double() * kept).abs().sum()
    ratio = out.double()[kept] / delta.double()[kept]
    assert (ratio - factor).abs().max() <= 2**-7 * factor
    # Keep rates run from 0.1 (smallest |δ| of a row) to 0.9 (largest).
    order = delta.float().abs().argsort(dim=1)
    by_rank = kept.gather(1, order).double()
    assert by_rank[:, :50].mean() < 0.2
    assert by_rank[:, -50:].mean() > 0.8


@pytest.mark.parametrize("out_dtype", [None, "bfloat16"])
def test_arcee_fusion_writes_mergekit_fp32_result_unless_out_dtype(
    llama: dict[str, Path], tmp_path: Path, out_dtype: str | None
) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: arcee_fusion\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {llama['ft_a']}\ndtype: bfloat16\n"
        + (f"out_dtype: {out_dtype}\n" if out_dtype else ""),
    )
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(out), "--numerics", "mergekit"])
    assert res.exit_code == 0, res.output
    dtypes = {t.dtype for t in load_state(out).values() if t.is_floating_point()}
    assert dtypes == {torch.float32 if out_dtype is None else torch.bfloat16}
