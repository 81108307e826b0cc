"""End-to-end merges: recipe → plan → streaming executor → safetensors folder.

Outputs are read back with the safetensors library (`load_state`) and with
transformers, and compared with expectations computed here from the inputs' tensors.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml
from conftest import FAMILY_NAMES, load_state, valid_value, write_recipe
from safetensors.torch import save_file

from weightops.demo import fine_tune, tiny_model
from weightops.engine.plan import build_plan
from weightops.engine.run import RunOptions, execute
from weightops.merge import all_methods, merge_method
from weightops.merge.registry import _REGISTRY, MethodSpec
from weightops.recipe import load_recipe, parse_recipe

IDS = torch.tensor([[3, 17, 42, 99, 150, 7, 255, 1, 64, 128, 200, 33]])


# --------------------------------------------------------------------------- helpers


def merge(recipe_text: str, out: Path, **options) -> Path:
    options.setdefault("device", "cpu")
    options.setdefault("progress", False)
    plan = build_plan(parse_recipe(recipe_text))
    return execute(plan, out, RunOptions(**options))


def dump(data: dict) -> str:
    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)


def recipe_for(spec: MethodSpec, fam: dict[str, Path]) -> dict:
    """A valid recipe for any registered method, from its spec alone."""
    required = [p for p in spec.params.values() if p.required]
    per_model = {p.name: valid_value(p) for p in required if p.per_model}
    shared = {p.name: valid_value(p) for p in required if not p.per_model}
    if spec.base == "unused" and spec.max_models == 1:
        # A one-source-per-tensor method: stack layer ranges (frankenmerge).
        halves = [(str(fam["ft_a"]), [0, 2]), (str(fam["ft_b"]), [2, 4])]
        data: dict = {
            "merge_method": spec.name,
            "slices": [
                {
                    "sources": [
                        {
                            "model": m,
                            "layer_range": r,
                            **({"parameters": per_model} if per_model else {}),
                        }
                    ]
                }
                for m, r in halves
            ],
        }
    else:
        n = max(spec.min_models, 2)
        if spec.max_models is not None:
            n = min(n, spec.max_models)
        models = [str(fam[k]) for k in ("ft_a", "ft_b", "ft_c")[:n]]
        data = {"merge_method": spec.name}
        if spec.base != "unused":
            data["base_model"] = str(fam["base"])
        data["models"] = [
            {"model": m, **({"parameters": per_model} if per_model else {})} for m in models
        ]
    if shared:
        data["parameters"] = shared
    data["dtype"] = "float32"
    return data


def load_model(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _np_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Independent float64 SLERP of flattened tensors (lerp when nearly parallel)."""
    fa, fb = a.double().numpy().reshape(-1), b.double().numpy().reshape(-1)
    cos = float(np.dot(fa, fb) / (np.linalg.norm(fa) * np.linalg.norm(fb)))
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > 0.9995:
        out = (1 - t) * fa + t * fb
    else:
        om = math.acos(cos)
        out = (math.sin((1 - t) * om) * fa + math.sin(t * om) * fb) / math.sin(om)
    return torch.from_numpy(out.reshape(a.shape)).float()


# ------------------------------------------------------- every method, end to end


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_method_runs_and_loads_in_transformers(name, llama, tmp_path):
    spec = all_methods()[name]
    out = merge(dump(recipe_for(spec, llama)), tmp_path / "out")
    state = load_state(out)
    assert set(state) == set(load_state(llama["base"]))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    model = load_model(out)
    assert torch.isfinite(logits(model)).all()


@pytest.fixture(scope="module")
def clones(llama, tmp_path_factory) -> dict[str, Path]:
    """Byte-identical copies of llama's base and ft_a in separate folders."""
    import shutil

    root = tmp_path_factory.mktemp("clones")
    return {
        **{k: Path(shutil.copytree(llama["base"], root / k)) for k in ("b1", "b2", "b3")},
        "a2": Path(shutil.copytree(llama["ft_a"], root / "a2")),
    }


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_method_merging_identical_models_returns_the_model(name, llama, clones, tmp_path):
    # Base and every input hold the same tensors (in different folders).
    fam = {"base": llama["base"], "ft_a": clones["b1"], "ft_b": clones["b2"], "ft_c": clones["b3"]}
    got = load_state(merge(dump(recipe_for(all_methods()[name], fam)), tmp_path / "out"))
    want = load_state(llama["base"])
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


# Methods that overwrite their inputs get the same tensor object twice when a recipe
# lists one folder twice (run.InputStream._load caches by InputRef and _to_compute's
# .to() is a no-op for fp32 on the CPU).


@pytest.mark.parametrize(
    "name",
    [
        m
        for m in sorted(all_methods())
        if all_methods()[m].max_models is None or all_methods()[m].max_models >= 2
    ],
)
def test_same_folder_twice_equals_two_identical_folders(name, llama, clones, tmp_path):
    spec = all_methods()[name]
    twice = {**llama, "ft_b": llama["ft_a"], "ft_c": llama["ft_a"]}
    copies = {**llama, "ft_b": clones["a2"], "ft_c": clones["a2"]}
    if spec.min_models > 2:
        pytest.skip("needs more distinct inputs than this check builds")
    got = load_state(merge(dump(recipe_for(spec, twice)), tmp_path / "twice"))
    want = load_state(merge(dump(recipe_for(spec, copies)), tmp_path / "copies"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", [m for m in sorted(all_methods()) if all_methods()[m].elementwise])
def test_elementwise_methods_chunked_equal_whole(name, llama, tmp_path):
    # Elementwise methods may be run on row blocks; small blocks must not change a bit.
    text = dump(recipe_for(all_methods()[name], llama))
    whole = load_state(merge(text, tmp_path / "whole"))
    chunked = load_state(merge(text, tmp_path / "chunked", chunk_elements=1000))
    assert set(whole) == set(chunked)
    for k in whole:
        assert torch.equal(whole[k], chunked[k]), k


# ------------------------------------------------ every family: linear vs independent


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_linear_merge_matches_independent_computation(family, families, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = families[family]
    text = f"""
merge_method: linear
models:
  - model: {fam["ft_a"]}
    parameters: {{weight: 1.0}}
  - model: {fam["ft_b"]}
    parameters: {{weight: 3.0}}
dtype: float32
"""
    out = merge(text, tmp_path / "out", shard_size=50_000)
    a, b = load_state(fam["ft_a"]), load_state(fam["ft_b"])
    got = load_state(out)
    assert set(got) == set(a) == set(b)
    expected = {k: ((1.0 * a[k].double() + 3.0 * b[k].double()) / 4.0).float() for k in a}
    for k in a:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7, msg=k)

    merged = load_model(out)
    reference = AutoModelForCausalLM.from_pretrained(fam["base"]).eval()
    base_logits = logits(reference)
    result = reference.load_state_dict(expected, strict=False)
    assert not result.unexpected_keys
    tied = merged.config.tie_word_embeddings
    assert set(result.missing_keys) <= ({"lm_head.weight"} if tied else set())
    torch.testing.assert_close(logits(merged), logits(reference), rtol=0, atol=1e-5)
    # The merge changed the model (a copy of the base would not pass the line above).
    assert not torch.allclose(logits(merged), base_logits, atol=1e-4)


# ------------------------------------------------------------------- invariants


def test_linear_of_a_model_with_itself_is_exact(llama, tmp_path):
    text = f"""
merge_method: linear
models:
  - model: {llama["ft_a"]}
    parameters: {{weight: 1.0}}
  - model: {llama["ft_a"]}
    parameters: {{weight: 1.0}}
out_dtype: float32
"""
    got = load_state(merge(text, tmp_path / "out"))
    want = load_state(llama["ft_a"])
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize(("t", "endpoint"), [(0, "base"), (1, "ft_a")])
def test_slerp_endpoints_end_to_end(t, endpoint, llama, tmp_path):
    text = f"""
merge_method: slerp
base_model: {llama["base"]}
models:
  - model: {llama["base"]}
  - model: {llama["ft_a"]}
parameters:
  t: {t}
dtype: float32
"""
    got = load_state(merge(text, tmp_path / "out"))
    want = load_state(llama[endpoint])
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_task_arithmetic_weight_zero_returns_base(llama, tmp_path):
    text = f"""
merge_method: task_arithmetic
base_model: {llama["base"]}
models:
  - model: {llama["ft_a"]}
    parameters: {{weight: 0.0}}
parameters: {{lambda: 1.7}}
dtype: float32
"""
    got = load_state(merge(text, tmp_path / "out"))
    want = load_state(llama["base"])
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_slerp_gradient_over_depth(llama, tmp_path):
    # t: [0, 1] gives layer i of 4 the value i / 3; tensors outside the decoder
    # blocks see the first value (0, the base).
    text = f"""
merge_method: slerp
base_model: {llama["base"]}
models:
  - model: {llama["ft_a"]}
parameters:
  t: [0, 1]
dtype: float32
"""
    got = load_state(merge(text, tmp_path / "out"))
    base, ft = load_state(llama["base"]), load_state(llama["ft_a"])
    for layer, t in ((1, 1 / 3), (2, 2 / 3)):
        for part in ("mlp.down_proj.weight", "self_attn.q_proj.weight", "input_layernorm.weight"):
            k = f"model.layers.{layer}.{part}"
            torch.testing.assert_close(
                got[k], _np_slerp(base[k], ft[k], t), rtol=1e-5, atol=1e-6, msg=k
            )
    assert torch.equal(
        got["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(
        got["model.layers.3.mlp.up_proj.weight"], ft["model.layers.3.mlp.up_proj.weight"]
    )
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(got[k], base[k]), k


def test_linear_weight_gradient_over_depth(llama, tmp_path):
    # ft_b's weight [1, 0, 2] over depth: layers 0..3 at t = 0, 1/3, 2/3, 1 get
    # 1, (1-2/3)·1 + (2/3)·0 = 1/3, (2/3)·0 + (1/3)·2 = 2/3, and 2.
    text = f"""
merge_method: linear
models:
  - model: {llama["ft_a"]}
    parameters: {{weight: 1}}
  - model: {llama["ft_b"]}
    parameters: {{weight: [1, 0, 2]}}
dtype: float32
"""
    got = load_state(merge(text, tmp_path / "out"))
    a, b = load_state(llama["ft_a"]), load_state(llama["ft_b"])
    for layer, wb in ((0, 1.0), (1, 1 / 3), (2, 2 / 3), (3, 2.0)):
        k = f"model.layers.{layer}.mlp.gate_proj.weight"
        want = ((a[k].double() + wb * b[k].double()) / (1 + wb)).float()
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-7, msg=k)


def test_filters_apply_to_matching_tensors_only(llama, tmp_path):
    text = f"""
merge_method: slerp
base_model: {llama["base"]}
models:
  - model: {llama["ft_a"]}
parameters:
  t:
    - filter: mlp
      value: 1
    - filter: self_attn.q_proj
      value: 0.5
    - value: 0
dtype: float32
"""
    got = load_state(merge(text, tmp_path / "out"))
    base, ft = load_state(llama["base"]), load_state(llama["ft_a"])
    seen = {"mlp": 0, "q": 0, "other": 0}
    for k in base:
        if "mlp" in k:
            assert torch.equal(got[k], ft[k]), k
            seen["mlp"] += 1
        elif "self_attn.q_proj" in k:
            torch.testing.assert_close(
                got[k], _np_slerp(base[k], ft[k], 0.5), rtol=1e-5, atol=1e-6, msg=k
            )
            seen["q"] += 1
        else:
            assert torch.equal(got[k], base[k]), k
            seen["other"] += 1
    assert seen == {"mlp": 12, "q": 4, "other": len(base) - 16}


# ------------------------------------------------------------- tied embeddings


def test_tied_embeddings_stay_tied(families, tmp_path):
    fam = families["qwen2"]
    assert json.loads((fam["base"] / "config.json").read_text())["tie_word_embeddings"]
    assert "lm_head.weight" not in load_state(fam["base"])
    text = f"""
merge_method: ties
base_model: {fam["base"]}
models:
  - model: {fam["ft_a"]}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {fam["ft_b"]}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: float32
"""
    out = merge(text, tmp_path / "out")
    state = load_state(out)
    assert "lm_head.weight" not in state
    assert "model.embed_tokens.weight" in state
    model = load_model(out)
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def _add_lm_head(folder: Path) -> None:
    """Store the tied lm_head explicitly in an extra shard (some exporters do)."""
    state = load_state(folder)
    extra = "model-extra.safetensors"
    save_file(
        {"lm_head.weight": state["model.embed_tokens.weight"].clone()},
        folder / extra,
        metadata={"format": "pt"},
    )
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = extra
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("head_first", [True, False])
def test_tied_lm_head_present_in_one_input_only(head_first, families, tmp_path):
    import shutil

    fam = families["qwen2"]
    with_head = Path(shutil.copytree(fam["ft_a"], tmp_path / "ft_a_head"))
    _add_lm_head(with_head)
    order = [with_head, fam["ft_b"]] if head_first else [fam["ft_b"], with_head]
    text = dump(
        {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in order],
            "dtype": "float32",
        }
    )
    out = merge(text, tmp_path / "out")
    state = load_state(out)
    a, b = load_state(fam["ft_a"]), load_state(fam["ft_b"])
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(state[emb], (a[emb] + b[emb]) / 2)
    if "lm_head.weight" in state:
        torch.testing.assert_close(state["lm_head.weight"], state[emb])
    load_model(out)


# ------------------------------------------------------------------------ dtypes


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16")
    base = tiny_model(root / "base", "llama", seed=0, dtype=torch.bfloat16)
    return {
        "base": base,
        "ft_a": fine_tune(base, root / "ft_a", seed=1),
        "ft_b": fine_tune(base, root / "ft_b", seed=2),
    }


@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_bf16_inputs_output_dtype(out_dtype, bf16_family, tmp_path):
    fam = bf16_family
    a, b = load_state(fam["ft_a"]), load_state(fam["ft_b"])
    assert {v.dtype for v in a.values()} == {torch.bfloat16}
    data = {
        "merge_method": "linear",
        "models": [
            {"model": str(fam["ft_a"]), "parameters": {"weight": 1.0}},
            {"model": str(fam["ft_b"]), "parameters": {"weight": 1.0}},
        ],
    }
    if out_dtype:
        data["out_dtype"] = out_dtype
    out = merge(dump(data), tmp_path / "out")
    got = load_state(out)
    want_dtype = torch.float32 if out_dtype else torch.bfloat16
    assert {v.dtype for v in got.values()} == {want_dtype}
    for k in a:
        exact = (a[k].double() + b[k].double()) / 2
        torch.testing.assert_close(
            got[k].double(),
            exact.to(want_dtype).double(),
            rtol=0,
            atol=0 if out_dtype else 1e-2,
            msg=k,
        )
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == (
        "float32" if out_dtype else "bfloat16"
    )
    load_model(out)


# ------------------------------------------------------------------------ DARE


def _dare_recipe(fam: dict[str, Path], seed: int, method: str = "dare_ties") -> str:
    return f"""
merge_method: {method}
base_model: {fam["base"]}
models:
  - model: {fam["ft_a"]}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {fam["ft_b"]}
    parameters: {{weight: 0.4, density: 0.5}}
parameters:
  seed: {seed}
dtype: float32
"""


def test_dare_same_seed_identical_bytes_different_seed_differs(llama, tmp_path):
    one = merge(_dare_recipe(llama, 7), tmp_path / "one", shard_size=100_000)
    two = merge(_dare_recipe(llama, 7), tmp_path / "two", shard_size=100_000)
    three = merge(_dare_recipe(llama, 8), tmp_path / "three", shard_size=100_000)
    files = sorted(p.name for p in one.glob("*.safetensors"))
    assert len(files) > 1
    assert files == sorted(p.name for p in two.glob("*.safetensors"))
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    s1, s3 = load_state(one), load_state(three)
    differ = [k for k in s1 if not torch.equal(s1[k], s3[k])]
    matrices = [k for k in s1 if s1[k].dim() == 2]
    assert set(matrices) <= set(differ)


def test_dare_masks_differ_between_tensors(llama, tmp_path):
    # The generator is seeded from the seed and the tensor's name: same-shaped
    # tensors of different layers get different drop masks.
    out = merge(_dare_recipe(llama, 3, "dare_linear"), tmp_path / "out")
    got, base = load_state(out), load_state(llama["base"])
    k0, k1 = (f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1))
    kept0, kept1 = got[k0] != base[k0], got[k1] != base[k1]
    assert not torch.equal(kept0, kept1)


# --------------------------------------------------------- statistics pass hook

_METHOD = "test_engine_global_mean_shift"


class _MeanObserver:
    events: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def observe(self, name, tensors, base, params) -> None:
        _MeanObserver.events.append(f"observe:{name}")
        self.total += float(base.double().sum())
        self.count += base.numel()

    def result(self) -> object:
        return self.total / self.count


@pytest.fixture
def mean_shift_method():
    _MeanObserver.events = []

    def global_mean_shift(tensors, base, *, scale: float = 1.0, stats=None) -> torch.Tensor:
        """Test method: θ = θ_other − scale · (mean of every base tensor entry)."""
        _MeanObserver.events.append("apply")
        assert isinstance(stats, float)
        return tensors[0] - scale * stats

    merge_method(_METHOD, base="required", max_models=1, observer=_MeanObserver)(global_mean_shift)
    try:
        yield _METHOD
    finally:
        _REGISTRY.pop(_METHOD, None)
    assert _METHOD not in all_methods()


def test_statistics_pass_runs_first_and_feeds_the_method(mean_shift_method, llama, tmp_path):
    text = f"""
merge_method: {mean_shift_method}
base_model: {llama["base"]}
models:
  - model: {llama["ft_a"]}
parameters:
  scale: 2.0
dtype: float32
"""
    out = merge(text, tmp_path / "out")
    base, ft, got = load_state(llama["base"]), load_state(llama["ft_a"]), load_state(out)
    total = sum(float(v.double().sum()) for v in base.values())
    mean = total / sum(v.numel() for v in base.values())
    assert abs(mean) > 1e-6
    for k in ft:
        torch.testing.assert_close(
            got[k], (ft[k].double() - 2.0 * mean).float(), rtol=1e-6, atol=1e-6, msg=k
        )
    events = _MeanObserver.events
    observed = [e for e in events if e.startswith("observe:")]
    assert sorted(e.split(":", 1)[1] for e in observed) == sorted(base)
    first_apply = events.index("apply")
    assert first_apply == len(observed)  # every observation came before any apply
    assert events.count("apply") == len(base)


# ----------------------------------------------------------------------- slices


def test_passthrough_frankenmerge(llama, tmp_path):
    rdir = tmp_path / "recipes"
    rdir.mkdir()
    path = write_recipe(
        rdir / "franken.yaml",
        f"""
merge_method: passthrough
slices:
  - sources:
      - model: {llama["ft_a"]}
        layer_range: [0, 4]
  - sources:
      - model: {llama["ft_b"]}
        layer_range: [2, 4]
dtype: float32
""",
    )
    out = execute(
        build_plan(load_recipe(path), rdir),
        tmp_path / "out",
        RunOptions(device="cpu", progress=False),
    )
    got, a, b = load_state(out), load_state(llama["ft_a"]), load_state(llama["ft_b"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    layers = {int(k.split(".")[2]) for k in got if k.startswith("model.layers.")}
    assert layers == set(range(6))
    sources = {0: (a, 0), 1: (a, 1), 2: (a, 2), 3: (a, 3), 4: (b, 2), 5: (b, 3)}
    for k, v in got.items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            src, j = sources[i]
            assert torch.equal(v, src[k.replace(f"layers.{i}.", f"layers.{j}.", 1)]), k
    assert torch.equal(
        got["model.layers.5.mlp.down_proj.weight"], b["model.layers.3.mlp.down_proj.weight"]
    )
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])
    model = load_model(out)
    assert model.config.num_hidden_layers == 6
    assert torch.isfinite(logits(model)).all()


# ------------------------------------------------------------------ peak memory


def test_plan_peak_bytes_does_not_depend_on_depth(llama, tmp_path):
    deep = tiny_model(tmp_path / "deep", "llama", seed=0, layers=8)

    def peak(folder: Path) -> tuple[int, int]:
        plan = build_plan(
            parse_recipe(f"""
merge_method: linear
models:
  - model: {folder}
    parameters: {{weight: 1}}
  - model: {folder}
    parameters: {{weight: 2}}
""")
        )
        return plan.peak_bytes(2**20, 2**12), plan.output_bytes

    (p4, out4), (p8, out8) = peak(llama["base"]), peak(deep)
    assert out8 > out4  # the deeper model really is bigger
    assert p4 == p8
    assert p4 > 0


_MERGE_CHILD = """
import sys
from pathlib import Path
from weightops.engine.plan import build_plan
from weightops.engine.run import RunOptions, execute
from weightops.recipe import parse_recipe
execute(build_plan(parse_recipe(Path(sys.argv[1]).read_text())), Path(sys.argv[2]),
        RunOptions(device="cpu", progress=False, prefetch=2))
"""

# Runs the merge as its own child and reports that child's peak RSS (KiB on Linux).
_RSS_CHILD = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _synthetic(folder: Path, layers: int, hidden: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    state = {
        "model.embed_tokens.weight": torch.randn(512, hidden, generator=g),
        "model.norm.weight": torch.randn(hidden, generator=g),
        "lm_head.weight": torch.randn(512, hidden, generator=g),
    }
    for i in range(layers):
        for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            state[f"model.layers.{i}.{part}.weight"] = torch.randn(hidden, hidden, generator=g)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _peak_rss(tmp_path: Path, layers: int, env: dict[str, str] | None) -> int:
    import os

    root = tmp_path / f"d{layers}"
    a = _synthetic(root / "a", layers, 1024, 1)
    b = _synthetic(root / "b", layers, 1024, 2)
    recipe = write_recipe(
        root / "r.yaml",
        dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(a), "parameters": {"weight": 1}},
                    {"model": str(b), "parameters": {"weight": 1}},
                ],
            }
        ),
    )
    done = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, _MERGE_CHILD, str(recipe), str(root / "out")],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert len(load_state(root / "out")) == 3 + 4 * layers
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_peak_rss_does_not_depend_on_depth(tmp_path):
    # 16 layers hold 4x the data of 4 (≈ 200 MiB more per input), but peak RSS
    # stays within 15 %.
    rss = {layers: _peak_rss(tmp_path, layers, None) for layers in (4, 16)}
    assert rss[16] <= rss[4] * 1.15, rss


@pytest.mark.slow
def test_peak_rss_does_not_depend_on_depth_with_fixed_mmap_threshold(tmp_path):
    # Pinning glibc's mmap threshold returns every large buffer to the OS when freed,
    # so this measures what the engine itself keeps alive.
    env = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    rss = {layers: _peak_rss(tmp_path, layers, env) for layers in (4, 16)}
    assert rss[16] <= rss[4] * 1.15, rss
