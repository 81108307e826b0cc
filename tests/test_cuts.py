"""Magnitude trims on row blocks (TIES, Model Breadcrumbs): the cuts found by the
streaming selection must give the whole-tensor result bit for bit, ties included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_state
from safetensors.torch import save_file

from weightops.engine.plan import build_plan
from weightops.engine.run import RunOptions, execute
from weightops.merge.cuts import Cut, rank_range_cut, top_k_cut
from weightops.recipe import parse_recipe

SHAPE = (64, 48)


def _np_cut(mag: np.ndarray, position: int, rows: tuple[int, int], cols: int) -> Cut:
    """The cut at ascending stable rank `position`, seen from a row block, by numpy."""
    order = np.argsort(mag, kind="stable")
    value = mag[order[position]]
    tied = np.flatnonzero(mag == value)
    return Cut(
        position=position,
        value=float(value),
        less=int((mag < value).sum()),
        equal=len(tied),
        before=int((tied < rows[0] * cols).sum()),
    )


def _tied_delta(seed: int) -> np.ndarray:
    # Few distinct magnitudes: ties at any threshold, spread over every block.
    rng = np.random.default_rng(seed)
    levels = np.array([0.0, 0.25, 0.5, 1.0], dtype=np.float32)
    return (levels[rng.integers(0, 4, SHAPE)] * rng.choice([-1, 1], SHAPE)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 700, 1536, 2000, 3071])
@pytest.mark.parametrize("step", [1, 5, 64])
def test_top_k_on_blocks_matches_stable_descending_sort(k, step):
    delta = _tied_delta(k)
    flat = delta.reshape(-1)
    n = flat.size
    want = np.zeros_like(flat)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]  # ties in index order
    want[keep] = flat[keep]
    got = []
    for r0 in range(0, SHAPE[0], step):
        rows = (r0, min(SHAPE[0], r0 + step))
        cut = _np_cut(np.abs(flat), n - k, rows, SHAPE[1])
        block = torch.from_numpy(delta[rows[0] : rows[1]].copy())
        got.append(top_k_cut(block, cut))
    np.testing.assert_array_equal(torch.cat(got).numpy().reshape(-1), want)


@pytest.mark.parametrize(("lo", "hi"), [(100, 2000), (0, 1500), (1200, 3072), (900, 900)])
@pytest.mark.parametrize("step", [1, 7, 64])
def test_rank_range_on_blocks_matches_stable_ascending_sort(lo, hi, step):
    delta = _tied_delta(lo + hi)
    flat = delta.reshape(-1)
    n = flat.size
    order = np.argsort(np.abs(flat), kind="stable")
    want = flat.copy()
    want[order[:lo]] = 0
    want[order[hi:]] = 0
    got = []
    for r0 in range(0, SHAPE[0], step):
        rows = (r0, min(SHAPE[0], r0 + step))
        lower = _np_cut(np.abs(flat), lo, rows, SHAPE[1]) if lo > 0 else None
        upper = _np_cut(np.abs(flat), hi, rows, SHAPE[1]) if hi < n else None
        block = torch.from_numpy(delta[rows[0] : rows[1]].copy())
        got.append(rank_range_cut(block, lower, upper))
    np.testing.assert_array_equal(torch.cat(got).numpy().reshape(-1), want)


# ------------------------------------------------------------- end to end, engine


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory) -> dict[str, Path]:
    """bf16 models whose task vectors take few distinct values (many ties at every
    threshold), with one tensor much larger than the row blocks used below."""
    root = tmp_path_factory.mktemp("tied")
    rng = np.random.default_rng(0)
    shapes = {"embed.weight": (300, 40), "proj.weight": (40, 40), "norm.weight": (40,)}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    fam = {}
    for i, name in enumerate(("base", "ft_a", "ft_b", "ft_c")):
        tensors = {}
        for k, b in base.items():
            step = np.float32(2.0**-4)
            noise = rng.integers(-3, 4, b.shape).astype(np.float32) * step if i else 0
            tensors[k] = torch.from_numpy(b + noise).to(torch.bfloat16)
        folder = root / name
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "custom"}))
        fam[name] = folder
    return fam


def _merge(recipe: dict, out: Path, **options) -> dict[str, torch.Tensor]:
    plan = build_plan(parse_recipe(yaml.safe_dump(recipe)))
    execute(plan, out, RunOptions(device="cpu", progress=False, **options))
    return load_state(out)


RECIPES = [
    ("ties", {"density": 0.5}, {}),
    ("ties", {"density": 0.3}, {"normalize": False, "lambda": 0.7}),
    ("ties", {"density": 1.0}, {}),
    ("ties", {"density": 0.9}, {}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, {}),
    ("breadcrumbs", {"density": 0.9, "gamma": 0.0}, {}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.2}, {"normalize": True}),
    ("breadcrumbs_ties", {"density": 0.1, "gamma": 0.95}, {}),
]


@pytest.mark.parametrize(("method", "per_model", "shared"), RECIPES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_blocked_trims_equal_whole_tensor(method, per_model, shared, dtype, tied_family, tmp_path):
    fam = tied_family
    weights = (1.0, 0.5, 0.8)
    densities = (per_model["density"], per_model["density"] * 0.8, per_model["density"])
    models = [
        {"model": str(fam[n]), "parameters": {**per_model, "weight": w, "density": d}}
        for n, w, d in zip(("ft_a", "ft_b", "ft_c"), weights, densities, strict=True)
    ]
    recipe = {
        "merge_method": method,
        "base_model": str(fam["base"]),
        "models": models,
        "parameters": shared,
        "dtype": dtype,
    }
    whole = _merge(recipe, tmp_path / "whole")
    # 100 entries per block: 40-wide rows in blocks of 2, ties straddling every edge.
    blocked = _merge(recipe, tmp_path / "blocked", chunk_elements=100)
    assert set(whole) == set(blocked)
    for k in whole:
        assert torch.equal(whole[k].view(torch.int16), blocked[k].view(torch.int16)), k


def test_rescale_still_runs_whole(tied_family, tmp_path):
    # The L1 rescale sums the whole tensor in its own order: it is not split.
    fam = tied_family
    recipe = {
        "merge_method": "ties",
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(fam[n]), "parameters": {"weight": 1.0, "density": 0.4}}
            for n in ("ft_a", "ft_b")
        ],
        "parameters": {"rescale": True},
    }
    whole = _merge(recipe, tmp_path / "whole")
    blocked = _merge(recipe, tmp_path / "blocked", chunk_elements=100)
    for k in whole:
        assert torch.equal(whole[k], blocked[k]), k


def test_mergekit_numerics_stay_whole(tied_family, tmp_path):
    # mergekit's tie order comes from its unstable sort of the whole tensor: under
    # `--numerics mergekit` trims are never split into row blocks.
    fam = tied_family
    recipe = {
        "merge_method": "ties",
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(fam[n]), "parameters": {"weight": 1.0, "density": 0.4}}
            for n in ("ft_a", "ft_b", "ft_c")
        ],
        "dtype": "bfloat16",
    }
    outs = []
    for chunk in (100, 1 << 20):
        plan = build_plan(parse_recipe(yaml.safe_dump(recipe)), numerics="mergekit")
        out = tmp_path / f"out{chunk}"
        execute(plan, out, RunOptions(device="cpu", progress=False, chunk_elements=chunk))
        outs.append(load_state(out))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_blocked_trims_equal_whole_on_fp32_models(method, llama, tmp_path):
    # Continuous fp32 task vectors: every cut needs the histogram and the tally.
    models = [
        {"model": str(llama[n]), "parameters": {"weight": w, "density": d}}
        for n, w, d in (("ft_a", 0.7, 0.35), ("ft_b", 0.4, 0.8))
    ]
    recipe = {"merge_method": method, "base_model": str(llama["base"]), "models": models}
    whole = _merge(recipe, tmp_path / "whole")
    blocked = _merge(recipe, tmp_path / "blocked", chunk_elements=500)
    for k in whole:
        assert torch.equal(whole[k], blocked[k]), k


def test_tiny_nonzero_magnitudes_below_a_zero_cut(tmp_path):
    # Subnormal deltas share the lowest bucket with the zeros: the cut must still be
    # found exactly, not taken as 0.
    rng = np.random.default_rng(3)
    base = np.zeros((60, 20), dtype=np.float32)
    ft = base.copy()
    ft.reshape(-1)[rng.choice(base.size, 900, replace=False)] = np.float32(1e-40)
    ft.reshape(-1)[rng.choice(base.size, 50, replace=False)] = 0.5
    fam = {}
    for name, t in (("base", base), ("ft", ft)):
        folder = tmp_path / name
        folder.mkdir()
        save_file({"w.weight": torch.from_numpy(t)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "custom"}))
        fam[name] = folder
    recipe = {
        "merge_method": "ties",
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam["ft"]), "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    whole = _merge(recipe, tmp_path / "whole")
    blocked = _merge(recipe, tmp_path / "blocked", chunk_elements=100)
    assert torch.equal(whole["w.weight"], blocked["w.weight"])
    # An independent count: 600 entries survive (50 large, 550 of the subnormal ones).
    assert int(torch.count_nonzero(blocked["w.weight"])) == 600
