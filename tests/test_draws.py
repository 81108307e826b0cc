"""Random methods on row blocks (DARE, DELLA): each block must draw the numbers the
whole tensor draws, so blocked and whole runs agree bit for bit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_state
from safetensors.torch import save_file

from weightops.engine.draws import advance, positioned
from weightops.engine.plan import build_plan
from weightops.engine.run import RunOptions, execute
from weightops.engine.stream import pieces
from weightops.merge.registry import merge_method
from weightops.recipe import parse_recipe

SHAPES = {"embed.weight": (300, 40), "conv.weight": (90, 4, 5), "norm.weight": (2500,)}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """bf16 models with tensors several times larger than the row blocks used below:
    a matrix, a 3-D tensor (DELLA ranks each first-dimension slice) and a long 1-D one."""
    root = tmp_path_factory.mktemp("draws")
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    fam = {}
    for i, name in enumerate(("base", "ft_a", "ft_b", "ft_c")):
        tensors = {
            k: torch.from_numpy(b + (rng.standard_normal(b.shape).astype(np.float32) * 0.1 * i))
            .to(torch.bfloat16)
            .contiguous()
            for k, b in base.items()
        }
        folder = root / name
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "custom"}))
        fam[name] = folder
    return fam


def _recipe(fam, method: str, densities, dtype: str = "float32", **shared) -> dict:
    weights = (1.0, 0.5, 0.25)
    models = [
        {"model": str(fam[n]), "parameters": {"weight": w, "density": d}}
        for n, w, d in zip(("ft_a", "ft_b", "ft_c"), weights, densities, strict=True)
    ]
    if method.startswith("della"):
        for m in models:
            d = m["parameters"]["density"]
            m["parameters"]["epsilon"] = round(min(d, 1 - d, 0.1), 3)
    return {
        "merge_method": method,
        "base_model": str(fam["base"]),
        "models": models,
        "parameters": {"seed": 11, **shared},
        "dtype": dtype,
    }


def _merge(recipe: dict, out: Path, numerics: str = "default", **options) -> dict:
    plan = build_plan(parse_recipe(yaml.safe_dump(recipe)), numerics=numerics)
    execute(plan, out, RunOptions(device="cpu", progress=False, **options))
    return load_state(out)


CASES = [
    ("dare_linear", (0.5, 0.3, 0.7), {}),
    ("dare_linear", (0.5, 1.0, 0.2), {"normalize": True}),  # a non-drawing input between
    ("dare_ties", (0.3, 0.3, 0.3), {}),
    ("dare_ties", (1.0, 0.6, 1.0), {"rescale": False, "lambda": 0.7}),
    ("della", (0.5, 0.4, 0.7), {}),
    ("della_linear", (0.3, 1.0, 0.6), {"rescale": False}),
]


@pytest.mark.parametrize(("method", "densities", "shared"), CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("chunk", [100, 370])
def test_blocked_draws_equal_whole_tensor(
    method, densities, shared, dtype, chunk, family, tmp_path
):
    recipe = _recipe(family, method, densities, dtype, **shared)
    plan = build_plan(parse_recipe(yaml.safe_dump(recipe)))
    split = {p.task.name for p in pieces(plan, chunk) if p.rows is not None}
    # The matrix and the 3-D tensor are cut into row blocks (the last one shorter with
    # 370), so the comparison below is not vacuous; DELLA keeps 1-D tensors whole.
    assert {"embed.weight", "conv.weight"} <= split
    assert ("norm.weight" in split) == method.startswith("dare")
    whole = _merge(recipe, tmp_path / "whole")
    blocked = _merge(recipe, tmp_path / "blocked", chunk_elements=chunk)
    assert set(whole) == set(blocked)
    for k in whole:
        assert torch.equal(whole[k].view(torch.int16), blocked[k].view(torch.int16)), k


def test_dare_linear_equals_a_plain_derivation(family, tmp_path):
    # Independent of the engine: one generator per tensor, seeded from blake2b of
    # "seed:name", draws each model's mask over the whole tensor in turn. Weights are
    # powers of two, so every product is exact whatever the order of operations.
    densities, weights = (0.5, 1.0, 0.3), (1.0, 0.5, 0.25)
    recipe = _recipe(family, "dare_linear", densities)
    blocked = _merge(recipe, tmp_path / "blocked", chunk_elements=100)
    state = {n: load_state(family[n]) for n in ("base", "ft_a", "ft_b", "ft_c")}
    for name in SHAPES:
        digest = hashlib.blake2b(f"11:{name}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        base = state["base"][name].float()
        total = torch.zeros_like(base)
        for ft, d, w in zip(("ft_a", "ft_b", "ft_c"), densities, weights, strict=True):
            delta = state[ft][name].float() - base
            if d < 1:
                delta = delta * (torch.rand(base.shape, generator=g) < d) / d
            total += w * delta
        assert blocked[name].dtype == torch.float32
        assert torch.equal(blocked[name], base + total), name


def test_mergekit_numerics_stay_whole(family, tmp_path):
    # mergekit's L1 rescale sums the whole tensor: its variants are never split.
    recipe = _recipe(family, "dare_ties", (0.5, 0.3, 0.7), "bfloat16")
    plan = build_plan(parse_recipe(yaml.safe_dump(recipe)), numerics="mergekit")
    assert all(p.rows is None for p in pieces(plan, 100))
    small = _merge(recipe, tmp_path / "small", "mergekit", chunk_elements=100)
    large = _merge(recipe, tmp_path / "large", "mergekit")
    for k in small:
        assert torch.equal(small[k], large[k]), k


def test_gpu_generators_keep_tensors_whole(family):
    # A GPU generator does not draw entry by entry in order: no row blocks there.
    plan = build_plan(parse_recipe(yaml.safe_dump(_recipe(family, "dare_ties", (0.5,) * 3))))
    plan.draws_in_blocks = False
    assert all(p.rows is None for p in pieces(plan, 100))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_positioned_generators_continue_one_stream(dtype):
    # Four inputs of 1000 entries, the third drawing nothing: each generator starts
    # where its input's part of one stream starts.
    stream = torch.Generator().manual_seed(5)
    parts = [torch.rand(1000, generator=stream, dtype=dtype) for _ in range(3)]
    gens = positioned(5, [True, True, False, True], 1000, dtype, torch.device("cpu"))
    assert gens[2] is None
    for part, g in zip(parts, [gens[0], gens[1], gens[3]], strict=True):
        got = torch.cat([torch.rand(k, generator=g, dtype=dtype) for k in (300, 1, 699)])
        assert torch.equal(got, part)


def test_advance_skips_exactly_count_entries():
    a = torch.Generator().manual_seed(1)
    b = torch.Generator().manual_seed(1)
    torch.rand(200_003, generator=a)
    advance(b, 200_003, torch.float32)
    assert torch.equal(torch.rand(10, generator=a), torch.rand(10, generator=b))


def test_draws_needs_an_rng_argument():
    def no_rng(tensors, base, *, weight: float = 1.0):
        """A method that draws nothing."""
        return base

    with pytest.raises(ValueError, match="rng"):
        merge_method("draws_without_rng", draws=lambda params, shape: [True])(no_rng)
