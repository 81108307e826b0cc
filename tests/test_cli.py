"""The `weightops` command line: help, validate, inspect, dry runs and merges."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import load_state, write_recipe
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import weightops
from weightops.cli import app

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding demo-models/{base,ft_a,ft_b}, as `weightops demo --models-only`."""
    from weightops.demo import demo_models

    root = tmp_path_factory.mktemp("demo")
    demo_models(root)
    return root


def ties_recipe(path: Path, llama: dict[str, Path], extra: str = "") -> Path:
    return write_recipe(
        path,
        f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {llama['ft_a']}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {llama['ft_b']}\n    parameters: {{weight: 0.4, density: 0.7}}\n"
        f"dtype: float32\n{extra}",
    )


# ------------------------------------------------------------------------------ help


def test_app_help():
    result = invoke(["--help"])
    assert result.exit_code == 0, result.output
    for word in ("merge", "validate", "inspect", "demo", "--debug"):
        assert word in result.stdout


def test_no_arguments_shows_help():
    result = invoke([])
    assert "merge" in result.output
    assert "validate" in result.output


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (
            "merge",
            [
                "--output",
                "-o",
                "--shard-size",
                "--force",
                "--device",
                "--threads",
                "--dry-run",
                "--progress",
            ],
        ),
        ("validate", ["Recipe YAML", "model folder exists"]),
        ("inspect", ["--json"]),
        ("demo", ["--recipe", "--workdir", "--models-only"]),
    ],
)
def test_command_help(command, options):
    result = invoke([command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"weightops {command}" in result.stdout
    for option in options:
        assert option in result.stdout, option


def test_python_m_weightops_help():
    proc = subprocess.run(
        [sys.executable, "-m", "weightops", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "merge" in proc.stdout
    assert "Traceback" not in proc.stderr


# -------------------------------------------------------------------------- validate


def test_example_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"linear", "ties", "slerp", "task_arithmetic", "passthrough"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_validate_example_recipe(recipe, demo_dir, monkeypatch):
    monkeypatch.chdir(demo_dir)
    local = shutil.copy(recipe, demo_dir / recipe.name)
    method = yaml.safe_load(recipe.read_text())["merge_method"]
    result = invoke(["validate", Path(local).name])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{recipe.name}: ok ({method}, ")
    assert result.stderr == ""


def test_validate_without_demo_models_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = shutil.copy(RECIPES[0], tmp_path / RECIPES[0].name)
    result = invoke(["validate", Path(local).name])
    assert result.exit_code == 1
    assert "demo-models/" in result.stderr
    assert "not found" in result.stderr


# --------------------------------------------------------------------------- dry run


def test_dry_run_prints_plan_and_writes_nothing(llama, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama)
    out = tmp_path / "out"
    result = invoke(["merge", recipe, "-o", out, "--dry-run"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    lines = text.splitlines()
    assert "method      ties" in lines
    n = len(load_state(llama["base"]))
    assert f"tensors     {n}" in lines
    assert any(line.startswith("output size ") and "GB" in line for line in lines)
    assert any(line.startswith("peak memory ") and "GB" in line for line in lines)
    assert f"output      {out} (1 shard)" in lines
    # One line per planned tensor with its shape and the method call.
    assert sum(" ties(" in line for line in lines) == n
    assert not out.exists()
    assert list(tmp_path.glob(".out.weightops-*")) == []


def test_dry_run_counts_shards(llama, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama)
    out = tmp_path / "out"
    result = invoke(["merge", recipe, "-o", out, "--dry-run", "--shard-size", "100KB"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("output "))
    shards = int(line.rsplit("(", 1)[1].split()[0])
    assert shards > 1
    assert not out.exists()


# --------------------------------------------------------------------------- inspect


def test_inspect_json(llama):
    result = invoke(["inspect", llama["base"], "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    state = load_state(llama["base"])
    assert d["family"] == "llama"
    assert d["layers"] == 4
    assert d["parameters"] == sum(t.numel() for t in state.values())
    assert d["tensors"] == len(state)
    assert d["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert d["dtypes"] == {"float32": d["parameters"]}
    assert set(d["shards"]) == {p.name for p in llama["base"].glob("*.safetensors")}
    assert sum(r["params"] for r in d["roles"].values()) == d["parameters"]
    assert d["tied_embeddings"] is False


def test_inspect_text(llama):
    result = invoke(["inspect", llama["base"]])
    assert result.exit_code == 0, result.output
    n = sum(t.numel() for t in load_state(llama["base"]).values())
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{llama['base']}: llama (")
    assert lines[0].endswith("4 layers")
    assert any(line.startswith("parameters") and f"{n:,}" in line for line in lines)
    assert any(line.startswith("shard  ") for line in lines)


def test_inspect_single_file_and_tied_model(families):
    qwen = families["qwen2"]["base"]
    result = invoke(["inspect", qwen, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tied_embeddings"] is True
    shard = sorted(families["llama"]["base"].glob("*.safetensors"))[0]
    result = invoke(["inspect", shard, "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    stored = load_file(shard)
    assert d["tensors"] == len(stored)
    assert d["parameters"] == sum(t.numel() for t in stored.values())
    assert set(d["shards"]) == {shard.name}


# ----------------------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def sharded(llama, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, output) of a ties merge written with --shard-size 100KB."""
    root = tmp_path_factory.mktemp("sharded")
    recipe = ties_recipe(root / "r.yaml", llama)
    out = root / "merged"
    result = invoke(["merge", recipe, "-o", out, "--shard-size", "100KB"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stderr
    assert "\r" not in result.output
    return recipe, out


def test_sharded_output_and_index(sharded, llama):
    _, out = sharded
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    n = len(shards)
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    state = load_state(out)
    assert set(weight_map) == set(state) == set(load_state(llama["base"]))
    assert set(weight_map.values()) == {p.name for p in shards}
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            names = list(f.keys())
            sizes = [math.prod(f.get_slice(k).get_shape()) * 4 for k in names]
        assert all(weight_map[k] == shard.name for k in names)
        assert sum(sizes) <= 100_000 or len(names) == 1, (shard.name, sizes)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total


def test_output_shard_metadata(sharded):
    recipe, out = sharded
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"
        assert meta["weightops_version"] == weightops.__version__
        embedded = yaml.safe_load(meta["weightops_recipe"])
        assert embedded == yaml.safe_load(recipe.read_text())


def test_output_side_files(sharded, llama):
    _, out = sharded
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert not any(n.startswith(".") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 4
    assert (out / "tokenizer.json").read_bytes() == (llama["base"] / "tokenizer.json").read_bytes()
    card = (out / "README.md").read_text()
    assert "`ties`" in card
    assert "merge_method: ties" in card
    assert str(llama["base"]) in card


def test_merged_values_are_finite_and_differ_from_base(sharded, llama):
    _, out = sharded
    merged, base = load_state(out), load_state(llama["base"])
    changed = 0
    for name, t in merged.items():
        assert t.shape == base[name].shape
        assert t.isfinite().all(), name
        changed += not t.equal(base[name])
    assert changed > len(merged) // 2


def test_recipe_output_key_used_without_o(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = ties_recipe(tmp_path / "r.yaml", llama, extra="output: from-recipe\n")
    result = invoke(["merge", recipe])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-recipe" / "model.safetensors").is_file()
    assert (tmp_path / "from-recipe" / "config.json").is_file()


def test_o_overrides_recipe_output_key(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = ties_recipe(tmp_path / "r.yaml", llama, extra="output: from-recipe\n")
    result = invoke(["merge", recipe, "-o", tmp_path / "from-cli"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-cli" / "model.safetensors").is_file()
    assert not (tmp_path / "from-recipe").exists()


def test_no_output_anywhere(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = ties_recipe(tmp_path / "r.yaml", llama)
    result = invoke(["merge", recipe])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no output folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_progress_silent_unless_asked(llama, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama)
    quiet = invoke(["merge", recipe, "-o", tmp_path / "quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert "\r" not in quiet.output
    assert "tensors" not in quiet.stdout
    # The check above can fail: asking for the bar draws it with carriage returns.
    loud = invoke(["merge", recipe, "-o", tmp_path / "loud", "--progress"])
    assert loud.exit_code == 0, loud.output
    assert "\r" in loud.stderr
