"""Property-based fuzzing of every reader of untrusted input.

Each reader must, for any bytes, either return a valid result or raise a
WeightopsError (one line for the user): never another exception, never a hang. The
safetensors reader is judged against the `safetensors` library itself: a file it
accepts must be one the library accepts, read to the same bytes. The default run
tries a few hundred cases in a few seconds; `pytest -m slow` runs the long version
(bench/fuzz.py runs the full campaign, through the CLI too).
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from weightops.errors import WeightopsError
from weightops.io.jsonl import read_jsonl
from weightops.io.safe_read import parse_json
from weightops.io.safetensors_file import FileReader, read_header
from weightops.recipe import parse_recipe

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
LONG = settings(
    max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A valid file written by the safetensors library, then damaged."""
    n = draw(st.integers(1, 4))
    tensors = {}
    for i in range(n):
        shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        tensors[f"t{i}"] = torch.zeros(shape).to(dtype) + i
    path = Path(draw(st.just("/dev/shm") if Path("/dev/shm").is_dir() else st.just("/tmp")))
    path = path / f"weightops-fuzz-{id(tensors)}.safetensors"
    save_file(tensors, str(path))
    blob = path.read_bytes()
    path.unlink()
    (hlen,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + hlen])
    how = draw(st.sampled_from(["bytes", "hlen", "field", "raw_header", "none"]))
    if how == "bytes":
        b = bytearray(blob)
        for pos, bit in draw(
            st.lists(
                st.tuples(st.integers(0, len(b) - 1), st.integers(0, 7)), min_size=1, max_size=4
            )
        ):
            b[pos] ^= 1 << bit
        return bytes(b)
    if how == "hlen":
        return struct.pack("<Q", max(0, hlen + draw(st.integers(-9, 9)))) + blob[8:]
    if how == "none":
        return blob
    data = blob[8 + hlen :]
    if how == "field":
        name = draw(st.sampled_from(sorted(header)))
        if name == "__metadata__":
            header[name] = draw(json_values)
        else:
            header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(
                json_values
            )
        raw = json.dumps(header).encode()
    else:
        raw = (
            draw(st.binary(max_size=64))
            if draw(st.booleans())
            else json.dumps(draw(json_values)).encode()
        )
    return struct.pack("<Q", len(raw)) + raw + data


def _library(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception:
        return None


def _check_against_library(blob: bytes, path: Path) -> None:
    path.write_bytes(blob)
    try:
        infos, _ = read_header(path)
        with FileReader() as reader:
            ours = {name: reader.read(info) for name, info in infos.items()}
    except WeightopsError:
        return
    theirs = _library(path)
    assert theirs is not None, "accepted a file the safetensors library refuses"
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and tensor.shape == theirs[name].shape
        # Compare raw bytes: NaN payloads must match too.
        a = tensor.reshape(-1).view(torch.uint8)
        b = theirs[name].reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), name


@FAST
@given(blob=safetensors_files())
def test_safetensors_reader_agrees_with_the_library(blob, tmp_path):
    _check_against_library(blob, tmp_path / "f.safetensors")


@pytest.mark.slow
@LONG
@given(blob=safetensors_files())
def test_safetensors_reader_agrees_with_the_library_long(blob, tmp_path):
    _check_against_library(blob, tmp_path / "f.safetensors")


def _parse_any(data: bytes) -> None:
    try:
        value = parse_json(data.decode("utf-8", "surrogatepass"), "f", "the file")
    except (WeightopsError, UnicodeDecodeError):
        return
    json.dumps(value)  # what was accepted is plain JSON


@FAST
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_json_reader_never_crashes(data):
    _parse_any(data)


@FAST
@given(value=json_values)
def test_json_reader_reads_valid_json_back(value):
    text = json.dumps(value)
    try:
        parsed = parse_json(text, "f", "the file")
    except WeightopsError as e:
        # Only the documented limits refuse valid JSON: integers past 64 digits are not
        # generated here, so nothing else may be refused.
        pytest.fail(f"refused valid JSON {text!r}: {e}")
    assert parsed == value


RECIPE = (
    "merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n"
    "    parameters: {weight: 0.5, density: 0.5}\n  - model: c\n"
    "    parameters: {weight: [0.1, 0.9], density: 0.5}\ndtype: float32\n"
)
snippets = st.sampled_from(
    [
        "slices: []",
        "parameters: {lambda: []}",
        "x: " + "[" * 500 + "]" * 500,
        "y: 1" + "0" * 400,
        "z: .inf",
        "a: &a [1,1,1,1,1,1,1,1]\nb: [*a,*a,*a,*a,*a,*a,*a,*a]",
        "merge_method: [1]",
        "models: {}",
        "\t",
        "- 1",
    ]
)


@FAST
@given(
    pos=st.integers(0, len(RECIPE)),
    insert=st.binary(max_size=6).map(lambda b: b.decode("latin-1")) | snippets,
)
def test_recipe_parser_never_crashes(pos, insert):
    text = RECIPE[:pos] + insert + "\n" + RECIPE[pos:]
    with contextlib.suppress(WeightopsError):
        parse_recipe(text, "r.yaml")


def _read_jsonl_any(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        rows = read_jsonl(path)
    except WeightopsError:
        return
    assert all(isinstance(row, dict) for _, row in rows)


@FAST
@given(
    data=st.binary(max_size=300)
    | st.lists(json_values.map(json.dumps), max_size=5).map(lambda rows: "\n".join(rows).encode())
)
def test_jsonl_reader_never_crashes(data, tmp_path):
    _read_jsonl_any(tmp_path / "d.jsonl", data)


@pytest.mark.slow
@LONG
@given(
    data=st.binary(max_size=2000)
    | st.lists(json_values.map(json.dumps), max_size=20).map(lambda rows: "\n".join(rows).encode())
)
def test_jsonl_reader_never_crashes_long(data, tmp_path):
    _read_jsonl_any(tmp_path / "d.jsonl", data)
