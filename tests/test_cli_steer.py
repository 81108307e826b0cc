"""`weightops steer train | bake | ablate` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from weightops.cli import app
from weightops.steering import SteeringVector

PAIRS = [(f"I love item {i}.", f"I hate item {i}.") for i in range(8)]


def invoke(args: list[object]):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"positive": p, "negative": n}) for p, n in PAIRS) + "\n")
    return path


def logits(folder: Path, vec: SteeringVector | None = None, **apply: object) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = AutoTokenizer.from_pretrained(folder)("steer me", return_tensors="pt").input_ids
    with torch.no_grad():
        if vec is None:
            return model(ids).logits
        with vec.apply(model, **apply):
            return model(ids).logits


def test_train_bake_and_ablate_match_the_hooked_model(llama, pairs_file, tmp_path):
    vec_path = tmp_path / "v.safetensors"
    r = invoke(
        ["steer", "train", llama["base"], "--pairs", pairs_file, "--layers", "1,2", "-o", vec_path]
    )
    assert r.exit_code == 0, r.output
    vec = SteeringVector.load(vec_path)
    assert vec.layers == [1, 2] and vec.method == "pca_diff"

    r = invoke(
        [
            "steer",
            "bake",
            llama["base"],
            "--vector",
            vec_path,
            "--strength",
            3,
            "-o",
            tmp_path / "baked",
        ]
    )
    assert r.exit_code == 0, r.output
    torch.testing.assert_close(
        logits(tmp_path / "baked"), logits(llama["base"], vec, strength=3.0), atol=1e-4, rtol=0
    )

    r = invoke(
        [
            "steer",
            "ablate",
            llama["base"],
            "--vector",
            vec_path,
            "--layer",
            2,
            "-o",
            tmp_path / "abl",
        ]
    )
    assert r.exit_code == 0, r.output
    hooked = logits(llama["base"], vec, mode="ablate", layer=2)
    torch.testing.assert_close(logits(tmp_path / "abl"), hooked, atol=1e-4, rtol=0)


def test_train_auto_layers_and_gguf_output(llama, pairs_file, tmp_path):
    out = tmp_path / "v.gguf"
    r = invoke(
        [
            "steer",
            "train",
            llama["base"],
            "--pairs",
            pairs_file,
            "--layers",
            "auto",
            "--top",
            2,
            "--method",
            "mean_diff",
            "-o",
            out,
        ]
    )
    assert r.exit_code == 0, r.output
    assert "held-out accuracy" in r.stderr
    vec = SteeringVector.load(out)
    assert len(vec.layers) == 2


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "no pairs"),
        ('{"positive": "a"}\n', ":1:"),
        ('{"positive": "a", "negative": "b"}\nnot json\n', ":2:"),
    ],
)
def test_bad_pairs_files_name_the_line(llama, tmp_path, content, needle):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(content)
    r = invoke(
        ["steer", "train", llama["base"], "--pairs", pairs, "-o", tmp_path / "v.safetensors"]
    )
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and needle in r.stderr
    assert not (tmp_path / "v.safetensors").exists()


def test_bake_refuses_a_vector_from_another_model(llama, families, pairs_file, tmp_path):
    vec_path = tmp_path / "v.safetensors"
    assert (
        invoke(
            ["steer", "train", families["gpt2"]["base"], "--pairs", pairs_file, "-o", vec_path]
        ).exit_code
        == 0
    )
    r = invoke(
        [
            "steer",
            "bake",
            llama["base"],
            "--vector",
            vec_path,
            "--strength",
            1,
            "-o",
            tmp_path / "out",
        ]
    )
    assert r.exit_code == 1
    assert "hidden size" in r.stderr or "gpt2" in r.stderr
    assert not (tmp_path / "out").exists()


def test_bake_rejects_nan_strength(llama, pairs_file, tmp_path):
    vec_path = tmp_path / "v.safetensors"
    assert (
        invoke(["steer", "train", llama["base"], "--pairs", pairs_file, "-o", vec_path]).exit_code
        == 0
    )
    r = invoke(
        [
            "steer",
            "bake",
            llama["base"],
            "--vector",
            vec_path,
            "--strength",
            "nan",
            "-o",
            tmp_path / "out",
        ]
    )
    assert r.exit_code == 1 and "finite" in r.stderr
    assert not (tmp_path / "out").exists()
