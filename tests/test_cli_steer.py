"""`weightops steer train | bake | ablate` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from weightops.cli import app
from weightops.compat import causal_lm
from weightops.steering import SteeringVector

PAIRS = [(f"I love item {i}.", f"I hate item {i}.") for i in range(8)]


def invoke(args: list[object]):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"positive": p, "negative": n}) for p, n in PAIRS) + "\n")
    return path


def train_auto(model: Path, pairs: Path, out: Path):
    """`steer train --layers auto --top 2 --method mean_diff`."""
    return invoke(
        [
            "steer",
            "train",
            model,
            "--pairs",
            pairs,
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


def bake(model: Path, vector: Path, strength: float, dtype: str, out: Path):
    return invoke(
        [
            "steer",
            "bake",
            model,
            "--vector",
            vector,
            "--strength",
            strength,
            "--dtype",
            dtype,
            "-o",
            out,
        ]
    )


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
    r = train_auto(llama["base"], pairs_file, out)
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


def test_gguf_with_layer_zero_fails_before_any_work(llama, tmp_path, monkeypatch):
    import transformers

    def never(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    r = invoke(
        [
            "steer",
            "train",
            llama["base"],
            "--pairs",
            tmp_path / "none.jsonl",
            "--layers",
            "0,1",
            "-o",
            tmp_path / "v.gguf",
        ]
    )
    assert r.exit_code == 1
    assert "layer 0" in r.stderr and "--layers" in r.stderr and "vec." not in r.stderr
    assert not (tmp_path / "v.gguf").exists()


def test_gguf_with_all_layers_leaves_out_layer_zero(llama, pairs_file, tmp_path):
    out = tmp_path / "v.gguf"
    r = invoke(["steer", "train", llama["base"], "--pairs", pairs_file, "-o", out])
    assert r.exit_code == 0, r.output
    depth = json.loads((llama["base"] / "config.json").read_text())["num_hidden_layers"]
    assert SteeringVector.load(out).layers == list(range(1, depth))


def test_chat_template_wraps_each_text_as_a_user_turn(llama, pairs_file, tmp_path):
    tok = AutoTokenizer.from_pretrained(llama["base"])
    if not tok.chat_template:
        r = invoke(
            [
                "steer",
                "train",
                llama["base"],
                "--pairs",
                pairs_file,
                "--chat-template",
                "-o",
                tmp_path / "v.safetensors",
            ]
        )
        assert r.exit_code == 1 and "chat template" in r.stderr
        folder = tmp_path / "chat"
        import shutil

        shutil.copytree(llama["base"], folder)
        tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
        tok.save_pretrained(folder)
    else:
        folder = llama["base"]
    out = tmp_path / "v.safetensors"
    r = invoke(
        [
            "steer",
            "train",
            folder,
            "--pairs",
            pairs_file,
            "--chat-template",
            "--layers",
            "1",
            "--method",
            "mean_diff",
            "-o",
            out,
        ]
    )
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    wrapped = [
        (
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            ),
            tok.apply_chat_template(
                [{"role": "user", "content": n}], tokenize=False, add_generation_prompt=True
            ),
        )
        for p, n in PAIRS
    ]
    want = SteeringVector.train(model, tok, wrapped, method="mean_diff", layers=[1])
    plain = SteeringVector.train(model, tok, PAIRS, method="mean_diff", layers=[1])
    got = SteeringVector.load(out)
    torch.testing.assert_close(got.directions[1], want.directions[1], atol=1e-5, rtol=0)
    assert not torch.allclose(got.directions[1], plain.directions[1], atol=1e-3)


def test_ablate_takes_the_best_ranked_layer_or_asks(llama, pairs_file, tmp_path):
    auto = tmp_path / "auto.safetensors"
    r = train_auto(llama["base"], pairs_file, auto)
    assert r.exit_code == 0, r.output
    vec = SteeringVector.load(auto)
    best = vec.info["ranking"][0]
    r = invoke(["steer", "ablate", llama["base"], "--vector", auto, "-o", tmp_path / "a"])
    assert r.exit_code == 0, r.output
    assert f"layer {best}" in r.stderr
    hooked = logits(llama["base"], vec, mode="ablate", layer=best)
    torch.testing.assert_close(logits(tmp_path / "a"), hooked, atol=1e-4, rtol=0)

    plain = tmp_path / "plain.safetensors"
    r = invoke(["steer", "train", llama["base"], "--pairs", pairs_file, "-o", plain])
    assert r.exit_code == 0, r.output
    r = invoke(["steer", "ablate", llama["base"], "--vector", plain, "-o", tmp_path / "b"])
    assert r.exit_code == 1 and "--layer" in r.stderr
    assert not (tmp_path / "b").exists()


def test_bf16_source_baked_in_float32_on_request(tmp_path, pairs_file):
    from weightops.demo import tiny_model

    base = tiny_model(tmp_path / "bf16", "llama", seed=3, dtype=torch.bfloat16)
    vec_path = tmp_path / "v.safetensors"
    r = invoke(["steer", "train", base, "--pairs", pairs_file, "--layers", "1", "-o", vec_path])
    assert r.exit_code == 0, r.output
    outs = {}
    for dtype in ("source", "float32"):
        outs[dtype] = tmp_path / dtype
        r = bake(base, vec_path, 4, dtype, outs[dtype])
        assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(outs["source"] / "model.safetensors").values()} == {
        torch.bfloat16
    }
    f32 = load_file(outs["float32"] / "model.safetensors")
    assert {t.dtype for t in f32.values()} == {torch.float32}
    # fp32 output: the bf16 weights exactly, plus the fp32 bias.
    src = load_file(base / "model.safetensors")
    for name, t in src.items():
        torch.testing.assert_close(f32[name], t.float(), atol=0, rtol=0)
    card = (outs["float32"] / "README.md").read_text()
    assert "- steering" in card and "- merge" not in card
    config = json.loads((outs["float32"] / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    r = bake(base, vec_path, 1, "int8", tmp_path / "bad")
    assert r.exit_code == 1 and "--dtype" in r.stderr


def test_train_runs_a_bf16_checkpoint_in_fp32(pairs_file, tmp_path):
    """A mean of states over many texts read in bf16 would carry bf16's rounding (about
    three significant digits); the direction must be the fp32 model's."""
    from weightops.demo import tiny_model
    from weightops.prompting import encode_text

    folder = tiny_model(tmp_path / "bf16", "llama", seed=3, dtype=torch.bfloat16)
    out = tmp_path / "v.safetensors"
    args = ["steer", "train", folder, "--pairs", pairs_file, "--layers", "1"]
    r = invoke([*args, "--method", "mean_diff", "-o", out])
    assert r.exit_code == 0, r.output
    # Re-derived: block 1's output is transformers' hidden_states[2], read at the last
    # token of each text run alone in fp32.
    model = causal_lm(folder, torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        states = [
            model(torch.tensor([encode_text(tok, t)]), output_hidden_states=True).hidden_states[2][
                0, -1
            ]
            for pair in PAIRS
            for t in pair
        ]
    expected = torch.stack(states[0::2]).mean(0) - torch.stack(states[1::2]).mean(0)
    got = SteeringVector.load(out).directions[1]
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


def test_position_reads_an_earlier_token(llama, pairs_file, tmp_path):
    out = tmp_path / "v.safetensors"
    args = ["steer", "train", llama["base"], "--pairs", pairs_file, "--method", "mean_diff"]
    r = invoke([*args, "--layers", "1", "--position", "-2", "-o", out])
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(llama["base"])
    tok = AutoTokenizer.from_pretrained(llama["base"])
    # Independently: transformers' hidden_states[2] is block 1's output; one text at a
    # time, so no padding is involved.
    states = []
    for text in [t for p in PAIRS for t in p]:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            states.append(model(ids, output_hidden_states=True).hidden_states[2][0, -2])
    h = torch.stack(states)
    want = h[0::2].mean(0) - h[1::2].mean(0)
    got = SteeringVector.load(out)
    torch.testing.assert_close(got.directions[1], want, atol=1e-5, rtol=0)
    last = SteeringVector.train(model, tok, PAIRS, method="mean_diff", layers=[1])
    assert not torch.allclose(got.directions[1], last.directions[1], atol=1e-3)
    for extra, needle in (
        (["--position", "0"], "from the end"),
        (["--layers", "auto", "--position", "-2"], "auto"),
    ):
        r = invoke([*args, *extra, "-o", out])
        assert r.exit_code == 1 and needle in r.stderr, r.output
