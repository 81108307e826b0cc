"""Faults around a run: hostile files in a model folder, destinations that overlap the
inputs, a second run into the same folder, inputs that change mid-run, leftovers of
a killed run, and Ctrl-C at start-up."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from conftest import write_recipe
from test_bad_input import assert_clean_failure, invoke, leftovers, ties_recipe

import weightops.engine.run as run_mod
from weightops.errors import CheckpointError
from weightops.io.checkpoint import Checkpoint
from weightops.io.jsonl import JsonlError, read_jsonl
from weightops.io.safe_read import MAX_DEPTH, MAX_NODES, parse_json
from weightops.io.safetensors_file import read_header
from weightops.io.writer import StagingFolder


def _raw(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


# -------------------------------------------------------------- safetensors headers


@pytest.mark.parametrize(
    ("blob", "words"),
    [
        (
            _raw(
                b'{"__metadata__":[],"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                b"\0" * 4,
            ),
            "__metadata__",
        ),
        (_raw(b'{"a":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4), "dtype"),
        (_raw(b'{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', b"\0" * 4), "shape"),
        (
            _raw(b'{"a":{"dtype":"F32","shape":[9223372036854775808,0],"data_offsets":[0,0]}}'),
            "shape",
        ),
        (_raw(b'{"a":' + b"[" * 1000 + b"]" * 1000 + b"}"), "deep"),
        (
            _raw(
                b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                b"\0" * 4,
            ),
            "twice",
        ),
        (
            _raw(
                b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                b"\0" * 4,
            ),
            "overlaps",
        ),
        (
            _raw(b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
            "surrogate",
        ),
        (_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 8), "cover"),
        (_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}\0\0', b"\0" * 4), "JSON"),
    ],
    ids=[
        "metadata-list",
        "dtype-list",
        "bool-shape",
        "2^63-shape",
        "deep",
        "duplicate",
        "overlap",
        "surrogate",
        "uncovered",
        "nul-padding",
    ],
)
def test_bad_headers_are_refused(tmp_path, blob, words):
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=words):
        read_header(path)


def _nested(depth: int) -> str:
    """A JSON document whose deepest value (a scalar) sits at `depth`, the root at 1."""
    return "[" * (depth - 1) + "0" + "]" * (depth - 1)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (_nested(MAX_DEPTH + 1), "nested"),
        ('{"a": ' + _nested(MAX_DEPTH) + "}", "nested"),
        ('{"a": [1, "\\udc00"]}', "surrogate"),
        ('["ok", {"b": {"\\uD9FF": 1}}]', "surrogate"),
        ("[" + ",".join(["0"] * MAX_NODES) + "]", "values"),
    ],
    ids=["scalar-too-deep", "under-a-key", "escape-in-list", "escape-in-key", "too-many"],
)
def test_json_bounds_are_enforced(text, words):
    with pytest.raises(CheckpointError, match=words):
        parse_json(text, "f", "the file")


def test_json_at_the_bounds_is_read():
    assert parse_json(_nested(MAX_DEPTH), "f", "the file") is not None
    assert len(parse_json("[" + ",".join(["0"] * (MAX_NODES - 1)) + "]", "f", "x")) == MAX_NODES - 1
    # A lone surrogate in the text itself (not from an escape) is refused too.
    with pytest.raises(CheckpointError, match="surrogate"):
        parse_json('{"a": "\ud800"}', "f", "the file")


def test_header_length_inside_the_padding_is_refused(tmp_path):
    # The library pads headers with spaces; a length that ends inside the padding
    # would shift every tensor by a few bytes.
    path = tmp_path / "m.safetensors"
    header = b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}' + b" " * 6
    path.write_bytes(struct.pack("<Q", len(header) - 3) + header + b"abcd")
    with pytest.raises(CheckpointError, match="cover"):
        read_header(path)


def test_a_fifo_shard_is_refused_without_blocking(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="named pipe"):
        Checkpoint(folder)


def test_fifo_recipe_and_data_are_refused_without_blocking(tmp_path):
    recipe, data = tmp_path / "r.yaml", tmp_path / "d.jsonl"
    os.mkfifo(recipe)
    os.mkfifo(data)
    result = invoke(["validate", recipe])
    assert result.exit_code == 1 and "named pipe" in result.stderr
    with pytest.raises(JsonlError, match="named pipe"):
        read_jsonl(data)


def test_an_empty_model_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(_raw(b"{}"))
    with pytest.raises(CheckpointError, match="no tensors"):
        Checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        Checkpoint(folder)


@pytest.mark.parametrize(
    "content", [b"null", b"[1]", b"\xff{}", b'{"a":' + b"[" * 1000 + b"]" * 1000 + b"}"]
)
def test_bad_config_and_index_are_one_line_errors(llama_copy, tmp_path, content):
    for name in ("config.json", "model.safetensors.index.json"):
        folder = tmp_path / name
        shutil.copytree(llama_copy["base"], folder)
        (folder / name).write_bytes(content)
        result = invoke(["inspect", folder])
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith(f"error: {folder / name}: "), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_utf8_error_names_the_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(JsonlError, match=r"d\.jsonl:2: .*byte 25 is 0xff"):
        read_jsonl(path)


# --------------------------------------------------------------------- side files


def test_side_file_link_out_of_the_model_is_refused(llama, llama_copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text('{"password": "hunter2"}')
    tok = llama_copy["ft_a"] / "tokenizer_config.json"
    tok.unlink()
    tok.symlink_to(secret)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {llama_copy['ft_a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {llama['ft_b']}\n    parameters: {{weight: 1}}\n",
    )
    out = tmp_path / "out"
    assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, "outside the model folder")


def test_auto_map_is_not_copied(llama, llama_copy, tmp_path):
    folder = llama_copy["base"]
    for name in ("config.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        data["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
        (folder / name).write_text(json.dumps(data))
    recipe = ties_recipe(tmp_path / "r.yaml", folder, llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    assert invoke(["merge", recipe, "-o", out]).exit_code == 0
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((out / name).read_text())


# ------------------------------------------------------------------- destinations


def test_output_over_an_input_is_refused(llama, llama_copy, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama_copy["ft_a"], llama["ft_b"])
    before = sorted(p.name for p in llama_copy["ft_a"].iterdir())
    for out in (llama_copy["ft_a"], llama_copy["ft_a"] / "sub", llama_copy["ft_a"].parent):
        result = invoke(["merge", recipe, "-o", out, "--force"])
        assert result.exit_code == 1, result.output
        assert "input" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in llama_copy["ft_a"].iterdir()) == before


def test_output_over_the_working_folder_or_proc_is_one_line(llama, tmp_path, monkeypatch):
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", "/proc/weightops-x"):
        result = invoke(["merge", recipe, "-o", out, "--force"])
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert here.is_dir()


def test_a_second_run_into_a_locked_destination_fails(llama, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    holder = StagingFolder(out, force=False)
    holder.create()
    try:
        result = invoke(["merge", recipe, "-o", out])
        assert result.exit_code == 1
        assert "another weightops run" in result.stderr
    finally:
        holder.discard()
    assert leftovers(out) == []


def test_stale_staging_of_a_killed_run_is_removed(llama, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    stale = tmp_path / ".out.weightops-tmp-999999"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    result = invoke(["merge", recipe, "-o", out])
    assert result.exit_code == 0, result.output
    assert "removed" in result.stderr
    assert leftovers(out) == [out]


def test_an_input_rewritten_mid_run_fails_the_run(llama, llama_copy, tmp_path, monkeypatch):
    shard = sorted(llama_copy["ft_a"].glob("*.safetensors"))[3]
    real = run_mod.write_pieces

    def apply(*args, **kwargs):
        real(*args, **kwargs)
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))

    monkeypatch.setattr(run_mod, "write_pieces", apply)
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama_copy["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    assert_clean_failure(invoke(["merge", recipe, "-o", out]), out, "changed while it was read")


def test_an_input_deleted_mid_run_fails_the_run(llama, llama_copy, tmp_path, monkeypatch):
    shards = sorted(llama_copy["ft_a"].glob("*.safetensors"))
    real = run_mod.write_pieces

    def apply(*args, **kwargs):
        for shard in shards:
            shard.unlink()
        real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "write_pieces", apply)
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama_copy["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    assert_clean_failure(invoke(["merge", recipe, "-o", out]), out)


# ------------------------------------------------------------------------ signals


def test_an_error_left_by_a_swallowed_interrupt_reads_as_the_stop():
    # A Ctrl-C landing inside a library's import can be swallowed there and leave a
    # half-loaded module, whose next use fails with an unrelated error.
    code = (
        "from weightops import signals\n"
        "signals.install()\n"
        "import weightops.cli as cli\n"
        "def app():\n"
        "    signals._stopped.append(2)  # the stop a library swallowed\n"
        "    raise AttributeError(\"module 'numpy' has no attribute 'ndarray'\")\n"
        "cli.app = app\n"
        "cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "interrupted", proc.stderr


def _wait_for_imports(pid: int) -> None:
    """Return once the process has loaded numpy's or torch's compiled code: its imports
    are under way, after weightops took over SIGINT (its first step). Before Python
    itself has started, a Ctrl-C is the interpreter's, not weightops' (documented in
    docs/reliability.md), and a loaded machine can take most of a second to get there."""
    maps = f"/proc/{pid}/maps"
    if not os.path.exists(maps):
        time.sleep(0.3)
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with open(maps) as f:
                text = f.read()
        except OSError:
            return  # it ended already
        if "numpy" in text or "torch" in text:
            return
        time.sleep(0.002)


def test_ctrl_c_during_start_up_is_one_line(llama, tmp_path):
    recipe = ties_recipe(tmp_path / "r.yaml", llama["base"], llama["ft_a"], llama["ft_b"])
    out = tmp_path / "out"
    for delay in (0.0, 0.5, 1.2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "weightops", "merge", str(recipe), "-o", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for_imports(proc.pid)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        assert "Traceback" not in stderr, stderr
        if proc.returncode == 0:
            # The run finished before the signal: then it is complete.
            assert (out / "config.json").is_file()
            shutil.rmtree(out)
        else:
            assert proc.returncode == 130, stderr
            assert len([line for line in stderr.splitlines() if line.strip()]) == 1, (delay, stderr)
            assert leftovers(out) == []


def test_steer_train_refuses_pickled_weights(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"positive": "a", "negative": "b"}\n')
    result = invoke(["steer", "train", folder, "--pairs", pairs, "-o", tmp_path / "v.safetensors"])
    assert result.exit_code == 1
    assert "pickled" in result.stderr


@pytest.mark.parametrize("enabled", [True, False])
def test_parse_json_leaves_the_collector_as_it_found_it(enabled):
    # The parse runs with the collector paused; a good or a bad document must not leave
    # it off (or turn it on for a caller who had it off).
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        assert parse_json('{"a": [1, 2]}', "f", "x") == {"a": [1, 2]}
        assert gc.isenabled() is enabled
        with pytest.raises(CheckpointError):
            parse_json('{"a": 1, "a": 2}', "f", "x")
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
