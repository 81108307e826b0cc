"""Model averaging (`model_averaging`) and the Adaptive Model Averaging ratio search.

Expected tensors are written out by hand or computed here from the input checkpoints
with the formula α·θ_pre + (1 − α)·θ_post, never with the code under test.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from weightops.ama import AMAError, AveragedModel, layer_groups, ratios, search
from weightops.cli import app
from weightops.demo import fine_tune, tiny_model
from weightops.engine.plan import build_plan
from weightops.engine.run import RunOptions, execute
from weightops.errors import RecipeError
from weightops.merge import get_method
from weightops.recipe import load_recipe, parse_recipe

IDS = torch.tensor([[3, 17, 42, 99, 150, 7, 255, 1]])


def T(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def average(pre: torch.Tensor, post: torch.Tensor, name: str, **params) -> torch.Tensor:
    spec = get_method("model_averaging")
    full = {"alpha": None, "blocks": None, "others": "alpha", **params}
    if full["blocks"] is not None:
        full["blocks"] = spec.params["blocks"].validate(full["blocks"])[0]
    return spec([post.clone()], pre.clone(), full, name=name)


def merge(text: str, out: Path) -> Path:
    return execute(build_plan(parse_recipe(text)), out, RunOptions(device="cpu", progress=False))


def invoke(args: list[object]):
    return CliRunner().invoke(app, [str(a) for a in args])


# ----------------------------------------------------------- model_averaging


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    """A llama base and one fine-tune (conftest's `llama` builds every family; two
    models are all these tests need)."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny_model(root / "base", "llama", seed=0)
    return {"base": base, "ft_a": fine_tune(base, root / "ft_a", seed=1, scale=0.05)}


def test_alpha_zero_is_post_and_one_is_pre_exactly():
    pre, post = T(1.5, -2.0, 3.25), T(0.1, 0.2, -7.0)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(average(pre, post, name, alpha=0.0), post)
    assert torch.equal(average(pre, post, name, alpha=1.0), pre)
    # 0.25·[4, 0] + 0.75·[0, 8] = [1, 6]
    torch.testing.assert_close(average(T(4, 0), T(0, 8), name, alpha=0.25), T(1, 6))


def test_blocks_give_each_layer_its_alpha_and_the_rest_alpha():
    pre, post = T(1.0), T(0.0)  # the result is the α used
    blocks = [[3, 5, 0.1], [0, 2, 0.4]]  # unsorted on purpose
    want = {0: 0.4, 2: 0.4, 3: 0.1, 5: 0.1, 6: 0.7, 11: 0.7}
    for layer, alpha in want.items():
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        got = average(pre, post, name, alpha=0.7, blocks=blocks)
        torch.testing.assert_close(got, T(alpha), msg=name)
        # Every tensor of the layer follows its block under others: alpha.
        norm = f"model.layers.{layer}.input_layernorm.weight"
        torch.testing.assert_close(average(pre, post, norm, alpha=0.7, blocks=blocks), T(alpha))
    for outside in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(average(pre, post, outside, alpha=0.7, blocks=blocks), T(0.7))


def test_others_pre_averages_only_linear_weights():
    blocks = [[0, 3, 0.4]]

    def alpha_of(name: str, shape=(2, 2)) -> float:
        # pre is 1 and post 0, so the result is the α used.
        out = average(
            torch.ones(shape), torch.zeros(shape), name, alpha=0.2, blocks=blocks, others="pre"
        )
        return out.flatten()[0].item()

    assert alpha_of("model.layers.1.self_attn.o_proj.weight") == pytest.approx(0.4)
    assert alpha_of("lm_head.weight") == pytest.approx(0.2)
    assert alpha_of("model.embed_tokens.weight") == 1.0
    assert alpha_of("model.layers.1.post_attention_layernorm.weight", (2,)) == 1.0
    assert alpha_of("model.layers.1.self_attn.q_proj.bias", (2,)) == 1.0
    assert alpha_of("model.norm.weight", (2,)) == 1.0
    post = torch.full((2, 2), 3.0)
    got = average(torch.ones(2, 2), post, "model.embed_tokens.weight", alpha=0.2, others="post")
    assert torch.equal(got, post)


def test_gradient_alpha_through_the_engine(llama, tmp_path):
    # alpha [0, 1] over 4 layers: layer i gets i/3; tensors outside layers get t = 0.
    out = merge(
        f"""
merge_method: model_averaging
base_model: {llama["base"]}
models:
  - model: {llama["ft_a"]}
parameters:
  alpha: [0.0, 1.0]
dtype: float32
""",
        tmp_path / "out",
    )
    got, pre, post = load_state(out), load_state(llama["base"]), load_state(llama["ft_a"])
    for name, value in got.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        a = 0.0 if layer is None else layer / 3
        want = a * pre[name].double() + (1 - a) * post[name].double()
        torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-6, msg=name)
    assert torch.equal(got["model.embed_tokens.weight"], post["model.embed_tokens.weight"])
    assert torch.equal(
        got["model.layers.3.mlp.up_proj.weight"], pre["model.layers.3.mlp.up_proj.weight"]
    )


def _recipe(params: str, base: str = "a", model: str = "b") -> str:
    return f"merge_method: model_averaging\nbase_model: {base}\nmodels:\n  - model: {model}\nparameters:\n{params}\n"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("  alpha: 0.2\n  blocks: [[0, 5, 0.4], [5, 8, 0.3]]", "overlap"),
        ("  alpha: 0.2\n  blocks: [[4, 2, 0.4]]", "last layer comes before the first"),
        ("  alpha: 0.2\n  blocks: [[-1, 2, 0.4]]", "whole numbers from 0"),
        ("  alpha: 0.2\n  blocks: [[0, 2, 1.5]]", "must be <= 1"),
        ("  alpha: 0.2\n  blocks: [[0, 2, -0.1]]", "must be >= 0"),
        ("  alpha: 0.2\n  blocks: [[0, 2]]", "first_layer, last_layer, value"),
        ("  alpha: 0.2\n  blocks: 0.4", "must be a list"),
        ("  alpha: 1.2", "must be <= 1"),
        ("  alpha: [[0, 1, 0.5]]", "not a table"),
        ("  alpha: 0.2\n  others: both", "must be one of alpha, pre, post"),
        ("  blocks: [[0, 1, 0.5]]", "needs parameter 'alpha'"),
    ],
)
def test_bad_parameters_are_recipe_errors(params, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_recipe(params))


def test_blocks_beyond_the_models_depth_are_an_error(llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        _recipe("  alpha: 0.2\n  blocks: [[0, 1, 0.4], [2, 4, 0.3]]", llama["base"], llama["ft_a"])
    )
    with pytest.raises(RecipeError, match=r"names layer 4, but .* has 4 layers"):
        load_recipe(path)
    path.write_text(_recipe("  alpha: 0.2\n  blocks: [[0, 1, 0.4], [2, 3, 0.3]]", *_pair(llama)))
    assert load_recipe(path).parameters["blocks"] == [[0, 1, 0.4], [2, 3, 0.3]]


def _pair(llama: dict[str, Path]) -> tuple[str, str]:
    return str(llama["base"]), str(llama["ft_a"])


# ---------------------------------------------------------------- ratio search


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("budget", "eps", "n"), [(0.2, 0.2, 4), (0.5, 0.05, 7), (0.9, 1.0, 3)])
def test_mean_ratio_equals_the_budget(seed, budget, eps, n):
    logits = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 4
    r = ratios(logits, budget, eps).double()
    assert r.mean().item() == pytest.approx(budget, abs=1e-7)
    s = torch.sigmoid(logits.double()) + eps
    torch.testing.assert_close(r, budget * s / s.mean(), rtol=1e-6, atol=0)


def test_layer_groups():
    assert layer_groups(4, "layer") == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert layer_groups(26, "block3") == [(0, 7), (8, 15), (16, 25)]
    assert layer_groups(32, "block3") == [(0, 10), (11, 20), (21, 31)]
    assert layer_groups(7, "block3") == [(0, 2), (3, 4), (5, 6)]
    assert layer_groups(10, "block4") == [(0, 2), (3, 5), (6, 7), (8, 9)]
    for bad in ("block9", "block0", "blocks", "module"):
        with pytest.raises(AMAError):
            layer_groups(8, bad)


@pytest.fixture(scope="module")
def low_layers_differ(tmp_path_factory) -> dict[str, Path]:
    """A llama pair whose post model differs from pre in layers 0 and 1 only."""
    root = tmp_path_factory.mktemp("low")
    pre = tiny_model(root / "pre", "llama", seed=0)
    model = AutoModelForCausalLM.from_pretrained(pre)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("model.layers.0.", "model.layers.1.")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(root / "post")
    shutil.copy(pre / "tokenizer.json", root / "post")
    shutil.copy(pre / "tokenizer_config.json", root / "post")
    return {"pre": pre, "post": root / "post"}


def test_search_moves_ratios_up_where_the_objective_prefers_pre(low_layers_differ):
    pre, post = low_layers_differ["pre"], low_layers_differ["post"]
    with torch.no_grad():
        target = AutoModelForCausalLM.from_pretrained(pre)(IDS).logits

    def closer_to_pre(model):
        return ((model(IDS).logits - target) ** 2).mean()

    result = search(
        pre, post, objective=closer_to_pre, groups="block2", budget=0.3, lr=0.2, steps=12
    )
    assert len(result.history) == 12
    for step in result.history:
        assert sum(step.ratios) / 2 == pytest.approx(0.3, abs=1e-6)
    # Only the block of layers 0-1 can bring the model closer to pre: it takes the budget.
    low, high = result.ratios
    assert low > 0.35 and high < 0.25, result.ratios
    assert result.history[-1].objective < result.history[0].objective


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    pre = tiny_model(root / "pre", "gpt2", seed=0)
    return {"pre": pre, "post": fine_tune(pre, root / "post", seed=1, scale=0.05)}


@pytest.mark.parametrize(
    ("family", "others"),
    [("llama", "pre"), ("llama", "alpha"), ("gpt2", "alpha"), ("gpt2", "post")],
)
def test_averaged_model_equals_the_written_recipe(family, others, llama, gpt2_pair, tmp_path):
    # The hooked model the search scores must be the model its recipe merges, for
    # nn.Linear (llama) and Conv1D with biases (gpt2).
    pre, post = (llama["base"], llama["ft_a"]) if family == "llama" else gpt2_pair.values()
    averaged = AveragedModel(pre, post, "block2", budget=0.3, others=others)
    averaged.set_ratios(torch.tensor([0.55, 0.05]))
    with torch.no_grad():
        hooked = averaged.model(IDS).logits
    data = {
        "merge_method": "model_averaging",
        "base_model": str(pre),
        "models": [{"model": str(post)}],
        "parameters": {"alpha": 0.3, "blocks": [[0, 1, 0.55], [2, 3, 0.05]], "others": others},
    }
    merged = AutoModelForCausalLM.from_pretrained(merge(yaml.safe_dump(data), tmp_path / "m"))
    with torch.no_grad():
        want = merged(IDS).logits
        plain_pre = AutoModelForCausalLM.from_pretrained(pre)(IDS).logits
    assert (want - plain_pre).abs().max() > 1e-3  # the check is not vacuous
    torch.testing.assert_close(hooked, want, rtol=1e-4, atol=1e-5)


@pytest.fixture
def prefs(tmp_path) -> Path:
    path = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": f"Question {i}:", "chosen": f" answer {i} is fine.", "rejected": "no"}
        for i in range(6)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_cli_writes_a_recipe_that_merges_to_the_closed_form(llama, prefs, tmp_path):
    out = tmp_path / "ratios.yaml"
    pre, post = _pair(llama)
    r = invoke(
        [
            "ama-search",
            "--pre",
            pre,
            "--post",
            post,
            "--data",
            prefs,
            "-o",
            out,
            "--groups",
            "block2",
            "--budget",
            "0.25",
            "--lr",
            "0.2",
            "--batch-size",
            "2",
        ]
    )
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert text.startswith(f"# weightops merge {out} -o")
    blocks = yaml.safe_load(text)["parameters"]["blocks"]
    assert [b[:2] for b in blocks] == [[0, 1], [2, 3]]
    alphas = [b[2] for b in blocks]
    assert sum(alphas) / 2 == pytest.approx(0.25, abs=1e-6)
    assert alphas[0] != pytest.approx(0.25, abs=1e-4)  # three steps moved the ratios

    r = invoke(["merge", out, "-o", tmp_path / "merged", "--no-progress"])
    assert r.exit_code == 0, r.output
    got = load_state(tmp_path / "merged")
    a, b = load_state(pre), load_state(post)
    for name, value in got.items():
        parts = name.split(".")
        if name == "lm_head.weight":
            alpha = 0.25
        elif parts[1] == "layers" and parts[-2].endswith("_proj"):
            alpha = alphas[int(parts[2]) // 2]
        else:
            alpha = 1.0  # embeddings and norms come from θ_pre
        want = alpha * a[name].double() + (1 - alpha) * b[name].double()
        torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no examples"),
        (
            '{"prompt": "a", "chosen": "b"}\n{"prompt": "a", "chosen": \n',
            r"prefs.jsonl:2: not valid",
        ),
        ('{"prompt": "a", "chosen": "b"}\n\n[1, 2]\n', r"prefs.jsonl:3: expected a JSON object"),
        ('{"prompt": "a", "rejected": "b"}\n', r"prefs.jsonl:1: needs a non-empty string 'chosen'"),
        ('{"chosen": "b"}\n', r"prefs.jsonl:1: needs a string 'prompt'"),
        ('{"prompt": "' + "x" * 40 + '", "chosen": "b"}\n', r"prefs.jsonl:1: the prompt is"),
    ],
)
def test_data_file_errors_name_the_line(content, message, llama, tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(content)
    r = invoke(
        [
            "ama-search",
            "--pre",
            llama["base"],
            "--post",
            llama["ft_a"],
            "--data",
            path,
            "-o",
            tmp_path / "r.yaml",
            "--max-length",
            "32",
        ]
    )
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    assert re.search(message, r.output), r.output
    assert not (tmp_path / "r.yaml").exists()


def test_response_key_is_accepted(llama, tmp_path):
    data = [("Say it:", " it."), ("Again:", " again.")]
    result = search(*_pair(llama), data=data, groups="block2", steps=2)
    assert len(result.history) == 2 and len(result.ratios) == 2
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Say it:", "response": " it."}\n')
    assert len(search(*_pair(llama), data=path, groups="block2").history) == 1


def test_cli_help():
    r = invoke(["ama-search", "--help"])
    assert r.exit_code == 0
    for option in ("--pre", "--post", "--data", "--groups", "--budget", "--eps", "--reg"):
        assert option in r.output
    text = " ".join(r.output.split())
    assert "block3" in text and "Adaptive Model Averaging" in text
