"""`--executor ray`: the same bytes as the local executor, whatever the method, the
failures of workers, or a stop.

One local Ray instance with two CPUs serves the module. Small row blocks
(chunk_elements) make the tiny models' large tensors split into row ranges, several
per Ray task, and small ones batch, so every kind of work unit runs.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load_state, write_recipe
from test_engine import dump, recipe_for
from typer.testing import CliRunner

from weightops.cli import app
from weightops.engine import distributed
from weightops.engine.distributed import UNITS_PER_SLOT, plan_units
from weightops.engine.plan import build_plan
from weightops.engine.run import RunOptions, execute
from weightops.errors import CheckpointError, MergeError
from weightops.merge import all_methods, registry
from weightops.recipe import parse_recipe

METHODS = sorted(all_methods())
CHUNK = 256  # entries per row block: the tiny models' matrices are a few thousand


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def finest_units(monkeypatch):
    """Units as small as the row blocks allow, as on a large cluster: on the two-CPU
    test instance the linear-time ones would grow to a few whole-tensor batches
    (plan_units' `slots`), and no row range would run. Tests of that growth undo it."""
    monkeypatch.setattr(distributed, "UNITS_PER_SLOT", 10**9)


def run(text: str, out: Path, executor: str, **options) -> Path:
    options = {"device": "cpu", "progress": False, "chunk_elements": CHUNK, **options}
    plan = build_plan(parse_recipe(text))
    return execute(plan, out, RunOptions(executor=executor, shard_size=60_000, **options))


def files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def assert_same_output(text: str, tmp_path: Path, **options) -> None:
    # LAPACK and torch's reductions round differently with another thread count, and a
    # Ray task runs with one thread per CPU it holds: bytes match at equal --threads
    # (docs/scale.md).
    options.setdefault("threads", 1)
    local = files(run(text, tmp_path / "local", "local", **options))
    ray = files(run(text, tmp_path / "ray", "ray", **options))
    assert ray.keys() == local.keys()
    for name in local:
        assert ray[name] == local[name], name


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.weightops-*")) + [out] * out.exists()


# ------------------------------------------------------------------ work units


@pytest.mark.parametrize("slots", [None, 1])
def test_units_cover_every_tensor_once(llama, slots, monkeypatch):
    monkeypatch.setattr(distributed, "UNITS_PER_SLOT", UNITS_PER_SLOT)
    text = dump(recipe_for(all_methods()["ties"], llama))
    plan = build_plan(parse_recipe(text))
    units = plan_units(plan, RunOptions(chunk_elements=CHUNK), slots=slots)
    rows: dict[str, list[tuple[int, int]]] = {}
    for unit in units:
        if unit.rows is not None:
            assert len(unit.names) == 1
            rows.setdefault(unit.names[0], []).append(unit.rows)
    whole = [n for u in units if u.rows is None for n in u.names]
    assert sorted(whole + list(rows)) == sorted(t.name for t in plan.tasks)
    # ties cuts each task vector at a rank over the whole tensor: never split.
    assert not rows
    lin = build_plan(parse_recipe(dump(recipe_for(all_methods()["linear"], llama))))
    units = plan_units(lin, RunOptions(chunk_elements=CHUNK), slots=slots)
    split = [u for u in units if u.rows is not None]
    if slots:
        # Linear-time units grown to about UNITS_PER_SLOT per slot, never fewer.
        assert UNITS_PER_SLOT <= len(units) < len(plan_units(lin, RunOptions(chunk_elements=CHUNK)))
    assert split or slots, "no tensor of the tiny model was split: the test would prove nothing"
    shapes = {t.name: t.shape for t in lin.tasks}
    for name in {u.names[0] for u in split}:
        ranges = sorted(u.rows for u in split if u.names[0] == name)
        # Contiguous, from row 0 to the last, each a whole number of row blocks.
        assert ranges[0][0] == 0 and ranges[-1][1] == shapes[name][0]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        block = max(1, CHUNK // (torch.Size(shapes[name]).numel() // shapes[name][0]))
        assert all(r0 % block == 0 for r0, _ in ranges)
    assert any(len(u.names) > 1 for u in units), "no small tensors were batched"


# ------------------------------------------------------------------ bit identity


def test_units_grown_for_a_small_cluster_write_the_local_bytes(
    ray_session, llama, tmp_path, monkeypatch
):
    monkeypatch.setattr(distributed, "UNITS_PER_SLOT", UNITS_PER_SLOT)
    text = dump(recipe_for(all_methods()["task_arithmetic"], llama))
    plan = build_plan(parse_recipe(text))
    options = RunOptions(chunk_elements=CHUNK)
    assert len(plan_units(plan, options, slots=2)) < len(plan_units(plan, options))
    assert_same_output(text, tmp_path)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_writes_the_local_bytes(ray_session, name, llama, tmp_path):
    assert_same_output(dump(recipe_for(all_methods()[name], llama)), tmp_path)


def test_recipe_align_writes_the_local_bytes(ray_session, families, tmp_path):
    from test_align import config_of, permute_state, save_like

    fam = families["qwen2"]
    shuffled = save_like(
        fam["ft_b"],
        permute_state(load_state(fam["ft_b"]), config_of(fam["ft_b"]), seed=4),
        tmp_path / "ft_b_shuffled",
    )
    text = (
        f"merge_method: linear\nmodels:\n  - model: {fam['ft_a']}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {shuffled}\n    parameters: {{weight: 0.4}}\nalign:\n  to: {fam['ft_a']}\n"
    )
    assert_same_output(text, tmp_path)


def test_vocabulary_merge_writes_the_local_bytes(ray_session, tmp_path_factory, tmp_path):
    from test_vocab import CHAT, bpe_tokenizer, recipe, tiny_llama

    root = tmp_path_factory.mktemp("vocab")
    base = tiny_llama(root / "base", 64, bpe_tokenizer(64, []), seed=1)
    chatml = tiny_llama(root / "chatml", 66, bpe_tokenizer(64, CHAT), seed=2)
    data = recipe([base, chatml], base, "task_arithmetic", tokenizer={"source": "union"})
    assert_same_output(dump(data), tmp_path)


def test_lora_input_writes_the_local_bytes(ray_session, llama, tmp_path):
    from test_modules_lora import write_adapter

    gen = torch.Generator().manual_seed(0)
    stem = "base_model.model.model.layers.1.self_attn.q_proj"
    tensors = {
        f"{stem}.lora_A.weight": torch.randn(4, 64, generator=gen),
        f"{stem}.lora_B.weight": torch.randn(64, 4, generator=gen),
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(4, 320, generator=gen),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(64, 4, generator=gen),
    }
    folder = write_adapter(tmp_path / "adapter", {"r": 4, "lora_alpha": 8}, tensors)
    data = {
        "merge_method": "linear",
        "models": [
            {"model": f"{llama['base']}+{folder}", "parameters": {"weight": 1.0}},
            {"model": str(llama["ft_a"]), "parameters": {"weight": 3.0}},
        ],
    }
    assert_same_output(dump(data), tmp_path)


def test_modules_write_the_local_bytes(ray_session, tmp_path_factory, tmp_path):
    from test_modules_lora import _tiny_llava

    root = tmp_path_factory.mktemp("llava")
    base, a, b = (str(_tiny_llava(root / k, seed)) for k, seed in (("b", 0), ("a", 1), ("c", 2)))
    data = {
        "merge_method": "linear",
        "base_model": base,
        "modules": {
            "text_decoder": {
                "merge_method": "ties",
                "models": [
                    {"model": a, "parameters": {"weight": 0.7, "density": 0.5}},
                    {"model": b, "parameters": {"weight": 0.3, "density": 0.5}},
                ],
            },
            "vision_tower": {
                "models": [
                    {"model": a, "parameters": {"weight": [1.0, 0.0]}},
                    {"model": b, "parameters": {"weight": 1.0}},
                ],
            },
            "multi_modal_projector": {"merge_method": "passthrough", "models": [{"model": b}]},
        },
    }
    assert_same_output(dump(data), tmp_path)


def test_cli_multi_document_recipe_with_executor_ray(ray_session, llama, tmp_path):
    from test_recipe_compat import _multi

    recipe = _multi(tmp_path, llama)
    for executor in ("local", "ray"):
        out = str(tmp_path / executor)
        result = CliRunner().invoke(app, ["merge", str(recipe), "-o", out, "--executor", executor])
        assert result.exit_code == 0, result.output
    ray, local = files(tmp_path / "ray"), files(tmp_path / "local")
    # The card names the intermediate step's folder, which is beside each output.
    assert ray.pop("README.md") != b"" and local.pop("README.md") != b""
    assert ray == local
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_progress_shows_the_local_figures(ray_session, llama, tmp_path, capsys):
    text = dump(recipe_for(all_methods()["ties"], llama))
    n = len(build_plan(parse_recipe(text)).tasks)
    for executor in ("local", "ray"):
        run(text, tmp_path / executor, executor, progress=True)
        err = capsys.readouterr().err
        assert f"merge {n}/{n} tensors" in err, executor
        assert f"merge {n + 1}/" not in err


@pytest.fixture
def registered(monkeypatch):
    """Register methods for one test only."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry.merge_method


@pytest.mark.parametrize("mergeable", [True, False])
def test_statistics_pass_sees_every_tensor_once(
    ray_session, registered, mergeable, llama, tmp_path
):
    class Names:
        """Collects the names of the tensors it saw; `merge` adds another's."""

        def __init__(self) -> None:
            self.seen: list[str] = []

        def observe(self, name, tensors, base, params) -> None:
            self.seen.append(name)

        def result(self) -> int:
            assert len(set(self.seen)) == len(self.seen), "a tensor was observed twice"
            return len(self.seen)

    if mergeable:
        Names.merge = lambda self, other: self.seen.extend(other.seen)

    @registered("count_observed", observer=Names)
    def count_observed(tensors, base, *, stats):
        """Every entry is the number of tensors the statistics pass saw."""
        return torch.full_like(tensors[0], float(stats))

    text = f"merge_method: count_observed\nmodels:\n  - model: {llama['ft_a']}\n  - model: {llama['ft_b']}\n"
    run(text, tmp_path / "ray", "ray")
    got = load_state(tmp_path / "ray")
    floats = [n for n, t in got.items() if t.is_floating_point()]
    assert all(torch.all(got[n] == len(floats)) for n in floats)
    assert_same_output(text, tmp_path / "both")


# ------------------------------------------------------------------ faults


def test_a_worker_killed_mid_merge_is_retried_to_the_same_bytes(
    ray_session, registered, llama, tmp_path
):
    marker = tmp_path / "crashed"

    @registered("crash_once", min_models=2)
    def crash_once(tensors, base, *, name):
        """The mean; the worker computing the first MLP projection dies the first time."""
        if name == "model.layers.1.mlp.down_proj.weight" and not marker.exists():
            marker.touch()
            os._exit(1)
        return sum(tensors) / len(tensors)

    text = f"merge_method: crash_once\nmodels:\n  - model: {llama['ft_a']}\n  - model: {llama['ft_b']}\n"
    ray = files(run(text, tmp_path / "ray", "ray"))
    assert marker.exists(), "no worker died: the test proved nothing"
    local = files(run(text, tmp_path / "local", "local"))
    assert ray == local


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_ctrl_c_or_a_driver_failure_leaves_nothing(ray_session, stop, monkeypatch, llama, tmp_path):
    from weightops.engine import ray_exec

    def fail(self, job):
        raise stop

    # The driver stops after the first task is in, with others in flight.
    monkeypatch.setattr(ray_exec._TaskProgress, "done", fail)
    text = dump(recipe_for(all_methods()["ties"], llama))
    out = tmp_path / "out"
    with pytest.raises(stop):
        run(text, out, "ray")
    assert leftovers(out) == []
    time.sleep(1)  # a cancelled task that still ran would write now
    assert leftovers(out) == []


def test_an_input_missing_on_a_worker_is_the_local_error(ray_session, llama_copy, tmp_path):
    text = dump(recipe_for(all_methods()["linear"], llama_copy))
    plan = build_plan(parse_recipe(text))
    for shard in llama_copy["ft_b"].glob("*.safetensors"):
        shard.unlink()
    errors = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        with pytest.raises(CheckpointError) as info:
            execute(plan, out, RunOptions(device="cpu", progress=False, executor=executor))
        errors[executor] = str(info.value)
        assert leftovers(out) == []
    assert errors["ray"] == errors["local"]
    assert "cannot read safetensors file" in errors["local"]


def test_an_input_replaced_after_planning_fails_on_the_worker(ray_session, llama_copy, tmp_path):
    text = dump(recipe_for(all_methods()["linear"], llama_copy))
    plan = build_plan(parse_recipe(text))
    for shard in llama_copy["ft_b"].glob("*.safetensors"):
        shard.write_bytes(shard.read_bytes() + b" ")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="changed while it was read"):
        execute(plan, out, RunOptions(device="cpu", progress=False, executor="ray"))
    assert leftovers(out) == []


# ------------------------------------------------------------------ command line


def test_cli_merge_with_executor_ray(ray_session, llama, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", dump(recipe_for(all_methods()["ties"], llama)))
    result = CliRunner().invoke(
        app, ["merge", str(recipe), "-o", str(tmp_path / "ray"), "--executor", "ray"]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "local")])
    assert result.exit_code == 0, result.output
    assert files(tmp_path / "ray") == files(tmp_path / "local")


def test_dry_run_counts_the_ray_tasks(llama, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", dump(recipe_for(all_methods()["tsv_m"], llama)))
    args = ["merge", str(recipe), "-o", str(tmp_path / "o"), "--dry-run", "--executor", "ray"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    plan = build_plan(parse_recipe(recipe.read_text()))
    units = plan_units(plan, RunOptions())
    # Each matrix of a block or more on its own, the small tensors in batches.
    matrices = [t for t in plan.tasks if t.numel >= RunOptions().chunk_elements]
    assert len(units) >= len(matrices)
    assert f"executor    ray: {len(units)} tasks" in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_executor_is_one_line(llama, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", dump(recipe_for(all_methods()["linear"], llama)))
    result = CliRunner().invoke(
        app, ["merge", str(recipe), "-o", str(tmp_path / "o"), "--executor", "spark"]
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == ("error: --executor spark: unknown executor (use local or ray)")


def test_without_ray_installed_the_ray_executor_is_one_line(monkeypatch, llama, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    monkeypatch.delitem(sys.modules, "weightops.engine.ray_exec", raising=False)
    text = dump(recipe_for(all_methods()["linear"], llama))
    with pytest.raises(
        MergeError, match=r"Ray is not installed \(pip install 'weightops\[ray\]'\)"
    ):
        run(text, tmp_path / "o", "ray")
    assert leftovers(tmp_path / "o") == []


def test_quantize_without_ray_installed_is_one_line(monkeypatch, llama, tmp_path):
    from weightops.quant.mixed import QuantError
    from weightops.quant.model import quantize_model

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "weightops.quant.ray_exec", raising=False)
    monkeypatch.delitem(sys.modules, "weightops.engine.ray_exec", raising=False)
    with pytest.raises(QuantError, match=r"Ray is not installed"):
        quantize_model(llama["base"], tmp_path / "q", group_size=16, avg_bits=4, executor="ray")
    assert leftovers(tmp_path / "q") == []


def test_the_local_executor_never_imports_ray(llama, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", dump(recipe_for(all_methods()["linear"], llama)))
    code = (
        "import sys\nfrom weightops.cli import app\n"
        f"try:\n    app(['merge', {str(recipe)!r}, '-o', {str(tmp_path / 'o')!r}])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'ray' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ quantize


@pytest.mark.parametrize("calibrated", [False, True])
def test_quantize_writes_the_local_bytes(ray_session, calibrated, llama, tmp_path):
    from weightops.quant.model import quantize_model

    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    options = {
        "group_size": 16,
        "avg_bits": 4.0,
        "calib": calib if calibrated else None,
        "shard_size": 60_000,
    }
    manifests = {}
    for executor in ("local", "ray"):
        manifests[executor] = quantize_model(
            llama["base"], tmp_path / executor, executor=executor, **options
        )
    assert manifests["ray"] == manifests["local"]
    assert files(tmp_path / "ray") == files(tmp_path / "local")
    assert len(files(tmp_path / "ray")) > 4  # several shards, the manifest, the card


def test_cli_quantize_with_executor_ray(ray_session, llama, tmp_path):
    args = ["quantize", str(llama["base"]), "--group-size", "16", "--avg-bits", "4"]
    for executor in ("local", "ray"):
        out = str(tmp_path / executor)
        result = CliRunner().invoke(app, [*args, "-o", out, "--executor", executor])
        assert result.exit_code == 0, result.output
    assert files(tmp_path / "ray") == files(tmp_path / "local")
