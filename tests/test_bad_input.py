"""Bad input through the CLI: every failure is one `error: ` line naming the culprit,
a non-zero exit, no traceback, and nothing left on disk (no output folder and no
hidden `.<name>.weightops-tmp-*` folder beside it)."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load_state, write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import weightops.engine.run as run_mod
import weightops.io.writer as writer_mod
from weightops.cli import _common, app
from weightops.errors import CheckpointError, WeightopsError

# ---------------------------------------------------------------------------- helpers


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def leftovers(out: Path) -> list[Path]:
    """The output folder and any staging or old-copy folder weightops put beside it."""
    found = list(out.parent.glob(f".{out.name}.weightops-*"))
    if out.exists():
        found.append(out)
    return found


def assert_clean_failure(result, out: Path, *needles: str, code: int | None = None) -> str:
    """Assert the run failed the documented way; return its stderr."""
    err = result.stderr
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    # The CLI turned the problem into an exit, not an escaping exception.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert lines[0].startswith("error: ") or lines[0].startswith("interrupted"), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert leftovers(out) == [], leftovers(out)
    return err


def ties_recipe(path: Path, base: Path, *models: Path, extra: str = "") -> Path:
    entries = "".join(
        f"  - model: {m}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for m in models
    )
    return write_recipe(
        path, f"merge_method: ties\nbase_model: {base}\nmodels:\n{entries}dtype: float32\n{extra}"
    )


def task_arithmetic_recipe(path: Path, base: Path, model: Path, lam: float = 1.0) -> Path:
    return write_recipe(
        path,
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {model}\n    parameters: {{weight: 1.0}}\n"
        f"parameters: {{lambda: {lam}}}\ndtype: float32\n",
    )


def index_of(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def layer_tensor(folder: Path) -> tuple[str, Path]:
    """A decoder-layer weight of the model and the shard that holds it."""
    wm = index_of(folder)
    name = next(n for n in sorted(wm) if ".layers.1." in n and n.endswith("proj.weight"))
    return name, folder / wm[name]


def rewrite_tensor(folder: Path, name: str, new: torch.Tensor | None) -> None:
    """Replace (or with None, delete) one tensor of a sharded checkpoint, index included."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    if new is None:
        del tensors[name]
        del index["weight_map"][name]
    else:
        tensors[name] = new
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def read_raw_header(path: Path) -> tuple[int, bytes]:
    data = path.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    return hlen, data[8 : 8 + hlen]


# ------------------------------------------------------------------- 1. missing model


def test_missing_model_folder(llama, tmp_path):
    missing = tmp_path / "no-such-model"
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], missing)
    out = tmp_path / "out"
    result = invoke(["merge", recipe, "-o", out])
    err = assert_clean_failure(result, out, str(missing), "models[1].model")
    assert err.splitlines()[0] == f"error: {recipe}: 1 problem"
    assert "not found" in err


# ------------------------------------------------------------------ 2. pickled weights


def test_pickled_bin_checkpoint_is_refused(llama, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_file(layer_tensor(llama["ft_a"])[1]), pickled / "pytorch_model.bin")
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], pickled)
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, str(pickled))
    assert "pickle" in err
    assert "safetensors" in err.split(str(pickled), 1)[1]  # says how to convert
    assert "save_pretrained" in err
    assert len(err.strip().splitlines()) == 1


# -------------------------------------------------------------- 3. damaged safetensors


def _truncate(shard: Path) -> None:
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _huge_header_length(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    shard.write_bytes(bytes(data))


def _invalid_json_header(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    hlen, _ = read_raw_header(shard)
    garbage = b'{"this is": not json' + b" " * (hlen - 20)
    data[8 : 8 + hlen] = garbage
    shard.write_bytes(bytes(data))


def _offsets_past_end(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    hlen, raw = read_raw_header(shard)
    header = json.loads(raw)
    header.pop("__metadata__", None)
    name = sorted(header)[0]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(data), len(data) + (end - begin)]
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= hlen, "no room to rewrite the header in place"
    data[8 : 8 + hlen] = new + b" " * (hlen - len(new))
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_truncate, "truncated"),
        (_huge_header_length, "header claims"),
        (_invalid_json_header, "not valid JSON"),
        (_offsets_past_end, "ends at byte"),
    ],
    ids=["truncated", "huge-header-length", "invalid-json-header", "offsets-past-end"],
)
def test_damaged_shard(llama, llama_copy, tmp_path, damage, words):
    _, shard = layer_tensor(llama_copy["ft_a"])
    damage(shard)
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama_copy["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, str(shard), words)
    assert len(err.strip().splitlines()) == 1


def test_damaged_shard_inspect(llama_copy):
    _, shard = layer_tensor(llama_copy["ft_b"])
    _truncate(shard)
    result = invoke(["inspect", llama_copy["ft_b"]])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"error: {shard}: ")


# ------------------------------------------------------ 4./5. missing tensor, bad shape


def test_tensor_missing_in_one_input(llama, llama_copy, tmp_path):
    name, _ = layer_tensor(llama_copy["ft_a"])
    rewrite_tensor(llama_copy["ft_a"], name, None)
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama_copy["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    err = assert_clean_failure(
        invoke(["merge", recipe, "-o", out]), out, name, str(llama_copy["ft_a"]), "missing"
    )
    assert len(err.strip().splitlines()) == 1


def test_tensor_missing_in_base(llama, llama_copy, tmp_path):
    name, _ = layer_tensor(llama_copy["base"])
    rewrite_tensor(llama_copy["base"], name, None)
    recipe = ties_recipe(tmp_path / "r.yaml", llama_copy["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, name)


def test_shapes_differ(llama, llama_copy, tmp_path):
    name, shard = layer_tensor(llama_copy["ft_b"])
    shape = list(load_file(shard)[name].shape)
    rewrite_tensor(llama_copy["ft_b"], name, torch.zeros(shape[0] + 1, shape[1]))
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama_copy["ft_b"])
    out = tmp_path / "out"
    err = assert_clean_failure(
        invoke(["merge", recipe, "-o", out]),
        out,
        name,
        str(llama_copy["ft_b"]),
        str([shape[0] + 1, shape[1]]),
        str(shape),
    )
    assert len(err.strip().splitlines()) == 1


def test_index_lists_missing_shard(llama, llama_copy, tmp_path):
    _, shard = layer_tensor(llama_copy["ft_a"])
    shard.unlink()
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama_copy["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    err = assert_clean_failure(
        invoke(["merge", recipe, "-o", out]),
        out,
        str(llama_copy["ft_a"] / "model.safetensors.index.json"),
        shard.name,
    )
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------- 6.-8. bad recipes


def recipe_problems(err: str) -> dict[str, str]:
    """{yaml path: message} from the indented lines under `error: <recipe>: N problems`."""
    out = {}
    for line in err.splitlines()[1:]:
        assert line.startswith("  "), line
        path, _, msg = line.strip().partition(": ")
        out[path] = msg
    return out


def test_recipe_file_missing(tmp_path):
    recipe = tmp_path / "nope.yaml"
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out)
    assert err.splitlines()[0] == f"error: {recipe}: 1 problem"
    assert "cannot read recipe" in err


def test_recipe_not_yaml(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: ties\nmodels: [\n")
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["validate", recipe]), out)
    assert err.splitlines()[0] == f"error: {recipe}: 1 problem"
    assert "not valid YAML" in err
    assert "line " in err


def test_unknown_method_suggests_closest(llama, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: tie\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {llama['ft_a']}\n    parameters: {{weight: 1.0}}\n",
    )
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, str(recipe))
    assert err.splitlines()[0] == f"error: {recipe}: 1 problem"
    msg = recipe_problems(err)["merge_method"]
    assert "'tie'" in msg
    assert "did you mean 'ties'" in msg
    for valid in ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "model_stock"):
        assert valid in msg


def test_unknown_keys_top_level_and_in_model_entry(llama, tmp_path):
    # mergekit ignores keys it does not know, so the merge runs with one warning per
    # key; --strict refuses them, each named with the closest valid key.
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {llama['base']}\nmerge_mthod: ties\nmodels:\n"
        f"  - model: {llama['ft_a']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {llama['ft_b']}\n    densty: 0.5\n    parameters: {{weight: 1.0}}\n",
    )
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out, "--strict"]), out)
    assert err.splitlines()[0] == f"error: {recipe}: 2 problems"
    problems = recipe_problems(err)
    assert set(problems) == {"merge_mthod", "models[1].densty"}
    assert all("has no effect" in m for m in problems.values())
    assert "did you mean 'merge_method'" in problems["merge_mthod"]
    result = invoke(["merge", recipe, "-o", out])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2
    assert (out / "config.json").is_file()


def test_unknown_parameter_in_model_entry(llama, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {llama['ft_a']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {llama['ft_b']}\n    parameters: {{weight: 1.0, densty: 0.5}}\n",
    )
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["validate", recipe, "--strict"]), out)
    problems = recipe_problems(err)
    assert list(problems) == ["models[1].parameters.densty"]
    assert "did you mean 'density'" in problems["models[1].parameters.densty"]


def test_unknown_keys_and_parameter_problems_reported_together(llama, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {llama['base']}\nfoo: 1\nmodels:\n"
        f"  - model: {llama['ft_a']}\n    parameters: {{weight: 1.0, densty: 0.5}}\n"
        f"  - model: {llama['ft_b']}\n    parameters: {{weight: 1.0}}\n",
    )
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["validate", recipe, "--strict"]), out)
    assert set(recipe_problems(err)) == {"foo", "models[0].parameters.densty"}


def test_missing_model_and_bad_parameter_reported_together(llama, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {tmp_path / 'nope'}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {llama['ft_b']}\n    parameters: {{weight: 1.0, density: 1.5}}\n",
    )
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["validate", recipe]), out)
    assert set(recipe_problems(err)) == {"models[0].model", "models[1].parameters.density"}


def test_ties_density_out_of_range_both_reported(llama, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {llama['ft_a']}\n    parameters: {{weight: 1.0, density: 0}}\n"
        f"  - model: {llama['ft_b']}\n    parameters: {{weight: 1.0, density: 1.5}}\n",
    )
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out)
    assert err.splitlines()[0] == f"error: {recipe}: 2 problems"
    problems = recipe_problems(err)
    assert set(problems) == {"models[0].parameters.density", "models[1].parameters.density"}
    assert "> 0" in problems["models[0].parameters.density"]
    assert "<= 1" in problems["models[1].parameters.density"]
    assert "1.5" in problems["models[1].parameters.density"]


@pytest.mark.parametrize(
    ("method", "body", "path"),
    [
        (
            "linear",
            "models:\n  - model: {a}\n    parameters: {{weight: -0.5}}\n"
            "  - model: {b}\n    parameters: {{weight: 1.0}}\n",
            "models[0].parameters.weight",
        ),
        (
            "slerp",
            "base_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n"
            "parameters: {{t: 2}}\n",
            "parameters.t",
        ),
    ],
)
def test_parameter_out_of_range(llama, tmp_path, method, body, path):
    text = f"merge_method: {method}\n" + body.format(
        base=llama["base"], a=llama["ft_a"], b=llama["ft_b"]
    )
    recipe = write_recipe(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out)
    assert err.splitlines()[0] == f"error: {recipe}: 1 problem"
    problems = recipe_problems(err)
    assert list(problems) == [path]
    assert "must be" in problems[path]


def test_all_range_problems_of_one_recipe_in_one_run(llama, tmp_path):
    # ties with per-model densities 0 and 1.5, a negative lambda is allowed but a
    # non-numeric one is not, and an unknown global parameter: all in one report.
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n"
        f"  - model: {llama['ft_a']}\n    parameters: {{weight: 1.0, density: 0}}\n"
        f"  - model: {llama['ft_b']}\n    parameters: {{weight: 1.0, density: 1.5}}\n"
        f"  - model: {llama['ft_c']}\n    parameters: {{weight: 1.0, density: [0.5, 2]}}\n"
        "parameters: {lambda: lots, normalize: 3}\n",
    )
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out)
    assert err.splitlines()[0] == f"error: {recipe}: 5 problems"
    assert set(recipe_problems(err)) == {
        "models[0].parameters.density",
        "models[1].parameters.density",
        "models[2].parameters.density",
        "parameters.lambda",
        "parameters.normalize",
    }


# ---------------------------------------------------------------------- 9. NaN / Inf


def test_nan_in_an_input(llama, llama_copy, tmp_path):
    name, shard = layer_tensor(llama_copy["ft_a"])
    bad = load_file(shard)[name].clone()
    bad[0, 0] = float("nan")
    rewrite_tensor(llama_copy["ft_a"], name, bad)
    recipe = task_arithmetic_recipe(tmp_path / "r.yaml", llama["base"], llama_copy["ft_a"])
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, name, "NaN")
    assert len(err.strip().splitlines()) == 1


def test_inf_from_huge_lambda(llama, tmp_path):
    recipe = task_arithmetic_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], lam=1e39)
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, "Inf")
    # The first tensor merged is named.
    first = err.removeprefix("error: ").split(":", 1)[0]
    assert first in load_state(llama["base"])


# ----------------------------------------------------------------------- 10. disk full


def test_disk_full_up_front(llama, tmp_path, monkeypatch):
    real = writer_mod.shutil.disk_usage

    def little_space(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1000, 1000)

    monkeypatch.setattr(writer_mod.shutil, "disk_usage", little_space)
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, str(out), "free")
    assert len(err.strip().splitlines()) == 1


def _enospc_after_first_call(monkeypatch) -> list[int]:
    real = writer_mod.os.pwrite
    calls = [0]

    def pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(writer_mod.os, "pwrite", pwrite)
    return calls


def test_disk_full_while_writing(llama, tmp_path, monkeypatch):
    calls = _enospc_after_first_call(monkeypatch)
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, "disk full")
    assert calls[0] >= 2  # the header went out, then a tensor write failed
    assert len(err.strip().splitlines()) == 1


def test_disk_full_while_writing_names_output_folder(llama, tmp_path, monkeypatch):
    _enospc_after_first_call(monkeypatch)
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, "disk full")
    assert err.startswith(f"error: {out}: ")
    assert "weightops-tmp" not in err


@pytest.mark.parametrize("job", ["quantize", "steer-ablate"])
def test_disk_full_while_rewriting_a_model(job, llama, tmp_path, monkeypatch):
    # Jobs that write one modified model hand the writes to a thread: its error still
    # ends the run cleanly, with nothing left at the destination.
    calls = _enospc_after_first_call(monkeypatch)
    out = tmp_path / "out"
    if job == "quantize":
        args = ["quantize", llama["base"], "-o", out, "--group-size", "16", "--bits", "4"]
    else:
        from weightops.steering.vector import SteeringVector

        vec = SteeringVector({1: torch.ones(64)}, "llama", 64).save(tmp_path / "v.safetensors")
        args = ["steer", "ablate", llama["base"], "--vector", vec, "-o", out, "--layer", "1"]
    err = assert_clean_failure(invoke(args), out, "disk full")
    assert calls[0] >= 2
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------ 11. Ctrl-C


def test_interrupt_in_process(llama, tmp_path, monkeypatch):
    real = run_mod._compute
    calls = [0]

    def compute(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "_compute", compute)
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    result = invoke(["merge", recipe, "-o", out])
    assert calls[0] == 4
    err = assert_clean_failure(result, out, "interrupted", code=130)
    assert "nothing was written" in err


def _big_checkpoint(folder: Path, config: dict, seed: int, n: int, dim: int) -> Path:
    """A Llama-named checkpoint of n large layer tensors (slow enough to interrupt)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": n}))
    base = torch.Generator().manual_seed(0)
    delta = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(n):
        t = torch.randn(dim, dim, generator=base)
        if seed:
            t += 0.01 * torch.randn(dim, dim, generator=delta)
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = t
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_sigint_subprocess(llama, tmp_path):
    config = json.loads((llama["base"] / "config.json").read_text())
    # A merge that ends before the signal lands proves nothing: try again, larger.
    for n in (64, 192, 512):
        root = tmp_path / str(n)
        root.mkdir()
        base = _big_checkpoint(root / "big-base", config, 0, n=n, dim=512)
        ft = _big_checkpoint(root / "big-ft", config, 1, n=n, dim=512)
        recipe = ties_recipe(root / "r.yaml", base, ft)
        out = root / "out"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weightops",
                "merge",
                str(recipe),
                "-o",
                str(out),
                "--threads=1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            # Wait until the hidden staging folder exists and holds the shard being written.
            while not list(root.glob(".out.weightops-tmp-*/*.safetensors")):
                if proc.poll() is not None:
                    break
                assert time.monotonic() < deadline, "the merge never started"
                time.sleep(0.005)
            sent = proc.poll() is None
            if sent:
                proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        if sent:
            break
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    assert leftovers(out) == []


# ------------------------------------------------------------- 12. existing output


def test_existing_output_needs_force(llama, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    result = invoke(["merge", recipe, "-o", out])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"error: {out}: ")
    assert "--force" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert list(tmp_path.glob(".out.weightops-*")) == []

    result = invoke(["merge", recipe, "-o", out, "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file()
    assert list(tmp_path.glob(".out.weightops-*")) == []


def test_output_path_is_a_file(llama, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    out.write_text("not a folder")
    result = invoke(["merge", recipe, "-o", out, "--force"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"error: {out}: ")
    assert out.read_text() == "not a folder"
    assert list(tmp_path.glob(".out.weightops-*")) == []


def test_failed_forced_run_keeps_the_old_output(llama, tmp_path):
    recipe = task_arithmetic_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], lam=1e39)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = invoke(["merge", recipe, "-o", out, "--force"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "NaN or Inf" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert list(tmp_path.glob(".out.weightops-*")) == []


def test_failed_run_leaves_no_parent_folders(llama, tmp_path):
    recipe = task_arithmetic_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], lam=1e39)
    out = tmp_path / "new" / "deeper" / "out"
    assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, "NaN or Inf")
    assert not (tmp_path / "new").exists()


def test_bad_shard_size_is_a_usage_error(llama, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    result = invoke(["merge", recipe, "-o", out, "--shard-size", "lots"])
    assert result.exit_code == 2
    assert "'lots' is not a size" in result.stderr
    assert "Traceback" not in result.output
    assert leftovers(out) == []


# ---------------------------------------------------------------------- 13. --debug


def test_debug_lets_the_exception_through(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "DEBUG", False)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], pickled)
    out = tmp_path / "out"
    result = invoke(["--debug", "merge", recipe, "-o", out])
    assert result.exit_code != 0
    assert isinstance(result.exception, CheckpointError)
    assert isinstance(result.exception, WeightopsError)
    assert result.exc_info is not None and result.exc_info[2] is not None
    assert str(pickled) in str(result.exception)
    assert leftovers(out) == []


def test_debug_interrupt_propagates_and_cleans_up(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "DEBUG", False)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "_compute", boom)
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    result = invoke(["--debug", "merge", recipe, "-o", out])
    assert result.exit_code != 0
    assert "interrupted: nothing was written" not in result.output
    assert leftovers(out) == []


# ---------------------------------------------------------------- 14. --device cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(llama, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out, "--device", "cuda"]), out)
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: --device cuda: ")
    assert "CUDA" in err
    assert "--device cpu" in err


def test_unknown_device(llama, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    err = assert_clean_failure(invoke(["merge", recipe, "-o", out, "--device", "tpu"]), out)
    assert err.startswith("error: --device tpu: ")
