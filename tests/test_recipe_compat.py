"""mergekit compatibility of recipes: what mergekit runs, weightops runs.

Keys mergekit silently ignores are warnings (YAML path, "has no effect", closest
valid name), errors with --strict; chat_template names; multi-document recipes
(mergekit-multi); --random-seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_state, write_recipe
from typer.testing import CliRunner

from weightops.cli import app
from weightops.errors import RecipeError
from weightops.recipe import parse_recipe


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def warned(text: str) -> dict[str, str]:
    return dict(parse_recipe(text).warnings)


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


# ------------------------------------------------------------------------ warnings


def test_misspelt_top_level_and_parameter_keys_are_warnings_with_closest_name():
    found = warned("""
merge_method: ties
dype: bfloat16
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, densty: 0.5}
parameters: {nomalize: false, int8_mask: true, rescale: true}
""")
    assert found == {
        "dype": "has no effect (unknown key); did you mean 'dtype'?",
        "parameters.nomalize": (
            "has no effect: ties takes no parameter 'nomalize'; did you mean 'normalize'?"
        ),
        "models[0].parameters.densty": (
            "has no effect: ties takes no parameter 'densty'; did you mean 'density'?"
        ),
    }


def test_a_parameter_the_method_does_not_use_is_a_warning():
    slerp = warned("""
merge_method: slerp
base_model: base
models:
  - model: a
    parameters: {weight: 0.5}
parameters: {t: 0.5}
""")
    assert list(slerp) == ["models[0].parameters.weight"]
    assert "slerp takes no parameter 'weight'" in slerp["models[0].parameters.weight"]
    assert "(valid: t)" in slerp["models[0].parameters.weight"]
    stock = warned("""
merge_method: model_stock
base_model: base
models:
  - {model: a, parameters: {weight: 1.0}}
  - {model: b, parameters: {weight: 1.0}}
""")
    assert set(stock) == {"models[0].parameters.weight", "models[1].parameters.weight"}
    ta = warned("""
merge_method: task_arithmetic
base_model: base
models:
  - {model: a, parameters: {weight: 1.0, density: 0.5}}
""")
    assert list(ta) == ["models[0].parameters.density"]
    assert "has no effect" in ta["models[0].parameters.density"]


def test_top_level_parameter_name_points_to_the_parameters_block():
    found = warned(
        "merge_method: ties\nint8_mask: true\nbase_model: base\n"
        "models: [{model: a, parameters: {weight: 1}}]\n"
    )
    assert found == {
        "int8_mask": "has no effect (unknown key); did you mean 'parameters.int8_mask'?"
    }


def test_name_in_a_single_document_recipe_is_a_warning():
    found = warned(
        "name: mine\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
    )
    assert list(found) == ["name"]
    assert found["name"].startswith("has no effect")


def test_model_reference_mappings_and_revisions():
    recipe = parse_recipe("""
merge_method: task_arithmetic
base_model: {model: {path: base, revision: main}}
models:
  - model: {model: a, revision: v2}
    parameters: {weight: 1}
  - model: {model: {path: b}}
    parameters: {weight: 1}
""")
    assert recipe.base_model == "base"
    assert [m.model for m in recipe.models] == ["a", "b"]
    found = dict(recipe.warnings)
    assert set(found) == {"base_model.model.revision", "models[0].model.revision"}
    assert all(m.startswith("has no effect") for m in found.values())
    assert "model.revision" in found["models[0].model.revision"]


def test_unknown_key_of_a_condition_is_a_warning():
    # mergekit drops `filtr`, so the condition applies to every tensor: say so.
    recipe = parse_recipe("""
merge_method: slerp
base_model: base
models: [{model: a}]
parameters:
  t:
    - {filtr: mlp, value: 0.2}
    - value: 0.5
""")
    assert dict(recipe.warnings) == {
        "parameters.t[0].filtr": "has no effect (unknown key); did you mean 'filter'?"
    }
    assert recipe.parameters["t"][0].filter is None


def test_whole_merge_parameter_under_a_model_and_base_parameters_are_warnings():
    found = warned("""
merge_method: dare_ties
base_model: base
models:
  - model: base
    parameters: {weight: 1.0, density: 0.5}
  - model: a
    parameters: {weight: 1.0, density: 0.5, int8_mask: true}
""")
    assert set(found) == {
        "models[0].parameters.weight",
        "models[0].parameters.density",
        "models[1].parameters.int8_mask",
    }
    assert "base model" in found["models[0].parameters.weight"]
    assert "did you mean 'parameters.int8_mask'?" in found["models[1].parameters.int8_mask"]


@pytest.mark.parametrize(
    ("method", "block"),
    [
        ("ties", "parameters: {int8_mask: true, rescale: true, normalize: false}"),
        ("dare_linear", "parameters: {int8_mask: true, rescale: false, normalize: true}"),
        ("breadcrumbs", "parameters: {int8_mask: true, rescale: true, normalize: true}"),
        ("ties", "parameters: {weight: 0.5, density: 0.5}"),  # per-model, given globally
    ],
)
def test_mergekit_parameters_where_mergekit_takes_them_are_used(method, block):
    recipe = parse_recipe(
        f"merge_method: {method}\nbase_model: base\nmodels: [{{model: a, parameters: {{weight: 1}}}}]\n"
        + block
        + "\n"
    )
    assert recipe.warnings == []


def test_slice_parameters_take_whole_merge_and_per_model_parameters():
    recipe = parse_recipe("""
merge_method: ties
base_model: base
slices:
  - sources:
      - {model: base, layer_range: [0, 2]}
      - {model: a, layer_range: [0, 2], parameters: {weight: 1}}
    parameters: {rescale: true, density: 0.5}
""")
    assert recipe.warnings == []


def test_keys_weightops_owns_and_broken_values_stay_errors():
    with pytest.raises(RecipeError) as info:
        parse_recipe("""
merge_method: ties
base_model: base
models: [{model: a, parameters: {weight: 1, density: 2}}]
align: {to: base, sed: 1}
""")
    problems = dict(info.value.problems)
    assert set(problems) == {"align.sed", "models[0].parameters.density"}


def test_a_bad_setting_is_reported_under_its_own_key():
    # Keys starting with a type's name (int8_mask, strength) used to lose their name.
    with pytest.raises(RecipeError) as info:
        parse_recipe(
            "merge_method: ties\nbase_model: b\n"
            "models: [{model: a, parameters: {weight: 1, strength: {x: 1}}}]\n"
            "parameters: {int8_mask: {x: 1}}\n"
        )
    problems = dict(info.value.problems)
    assert set(problems) == {"parameters.int8_mask", "models[0].parameters.strength"}
    assert all(m.startswith("is not a setting") for m in problems.values())


def test_strict_turns_every_warning_into_a_problem():
    text = "merge_method: linear\ndype: bf16\nmodels: [{model: a, parameters: {weight: 1, wieght: 2}}]\n"
    assert len(parse_recipe(text).warnings) == 2
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, strict=True)
    assert [p for p, _ in info.value.problems] == ["dype", "models[0].parameters.wieght"]
    assert "did you mean 'weight'?" in dict(info.value.problems)["models[0].parameters.wieght"]


def test_validate_lists_every_warning_and_strict_fails(llama, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {llama['base']}\ndype: float32\nmodels:\n"
        f"  - model: {llama['ft_a']}\n    parameters: {{weight: 1.0, densty: 0.5}}\n"
        f"  - model: {llama['ft_b']}\n    parameters: {{weight: 1.0, lambda: 2}}\n",
    )
    result = invoke("validate", recipe)
    assert result.exit_code == 0, result.output
    lines = warning_lines(result.stderr)
    assert lines == [
        f"warning: {recipe}: dype: has no effect (unknown key); did you mean 'dtype'?",
        f"warning: {recipe}: models[0].parameters.densty: has no effect: ties takes no "
        "parameter 'densty'; did you mean 'density'?",
        f"warning: {recipe}: models[1].parameters.lambda: has no effect: ties reads 'lambda' "
        "for the whole merge, from the top-level or slice parameters; did you mean "
        "'parameters.lambda'?",
    ]
    assert "ok (ties, 3 models)" in result.stdout
    strict = invoke("validate", recipe, "--strict")
    assert strict.exit_code == 1
    assert strict.stderr.splitlines()[0] == f"error: {recipe}: 3 problems"
    assert warning_lines(strict.stderr) == []


# ------------------------------------------------------------------- chat templates

_MESSAGES = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "More"},
]
# Written from each format's specification; bos is "<s>" and eos "<eos>" here.
_RENDERED = {
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nMore<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nMore<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "S\n\n### Instruction:\nHi\n\n### Response:\nYo\n\n### Instruction:\nMore"
    "\n\n### Response:\n",
    "mistral": "<s> [INST] S\n\nHi [/INST] Yo<eos> [INST] More [/INST]",
    "exaone": "[|system|]S[|endofturn|]\n[|user|]Hi\n[|assistant|]Yo[|endofturn|]\n"
    "[|user|]More\n[|assistant|]",
}


@pytest.mark.parametrize("name", sorted(_RENDERED))
def test_chat_template_names_merge_to_their_templates(name, llama, tmp_path):
    from transformers import AutoTokenizer

    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {llama['ft_a']}\n    parameters: {{weight: 1.0}}\n"
        f"chat_template: {name}\n",
    )
    out = tmp_path / "out"
    result = invoke("merge", recipe, "-o", out)
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(out)
    tok.bos_token = "<s>"
    text = tok.apply_chat_template(_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == _RENDERED[name]


def test_chat_template_auto_picks_the_most_common_one(llama, tmp_path):
    from weightops.chat_templates import resolve_chat_template

    folders = []
    for i, template in enumerate(["{{ 'x' }}", "{{ 'y' }}\n", "{{ 'y' }}", None]):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        if template is not None:
            (folder / "chat_template.jinja").write_text(template)
        folders.append(folder)
    assert resolve_chat_template("auto", folders) == "{{ 'y' }}"
    assert resolve_chat_template("auto", [folders[3]]) is None
    assert resolve_chat_template("auto", folders[:1]) == "{{ 'x' }}"


def test_chat_template_text_is_kept_and_unknown_names_are_errors():
    body = "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert parse_recipe(body + f'chat_template: "{template}"\n').chat_template == template
    with pytest.raises(RecipeError) as info:
        parse_recipe(body + "chat_template: chatlm\n")
    assert "did you mean 'chatml'?" in dict(info.value.problems)["chat_template"]


# ------------------------------------------------------------------- multi-document


def _multi(tmp_path: Path, llama: dict[str, Path], final: bool = True) -> Path:
    first = (
        f"name: avg\nmerge_method: linear\ndtype: float32\nmodels:\n"
        f"  - {{model: {llama['ft_a']}, parameters: {{weight: 1.0}}}}\n"
        f"  - {{model: {llama['ft_b']}, parameters: {{weight: 1.0}}}}\n"
    )
    last = (
        ("" if final else "name: plus\n")
        + f"merge_method: task_arithmetic\ndtype: float32\nbase_model: {llama['base']}\n"
        f"models:\n  - {{model: avg, parameters: {{weight: 2.0}}}}\n"
    )
    # The final document comes first: the order follows what each document reads.
    return write_recipe(tmp_path / "multi.yaml", last + "---\n" + first)


def test_multi_document_merge_runs_in_order_and_leaves_only_the_output(llama, tmp_path):
    recipe = _multi(tmp_path, llama)
    out = tmp_path / "out"
    result = invoke("merge", recipe, "-o", out)
    assert result.exit_code == 0, result.output
    a, b, base = (load_state(llama[k]) for k in ("ft_a", "ft_b", "base"))
    got = load_state(out)
    assert set(got) == set(base)
    for name, value in got.items():
        avg = (a[name].double() + b[name].double()) / 2
        want = base[name].double() + 2.0 * (avg - base[name].double())
        torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml", "out"]
    card = (out / "README.md").read_text()
    recipe_block = card.split("```yaml")[1]
    assert "- model: avg" in recipe_block and "weightops-steps" not in recipe_block


def test_multi_document_all_named_writes_each_under_its_name(llama, tmp_path):
    recipe = _multi(tmp_path, llama, final=False)
    out = tmp_path / "out"
    result = invoke("merge", recipe, "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["avg", "plus"]
    assert (out / "plus" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml", "out"]


def test_multi_document_failure_leaves_nothing(llama, families, tmp_path):
    # The final merge fails while planning (a model of another shape), after the
    # intermediate has been written: neither is left behind.
    recipe = _multi(tmp_path, llama)
    other = families["gemma"]["ft_a"]
    recipe.write_text(
        recipe.read_text().replace(
            "weight: 2.0}}\n",
            f"weight: 2.0}}}}\n  - {{model: {other}, parameters: {{weight: 1}}}}\n",
        )
    )
    out = tmp_path / "out"
    result = invoke("merge", recipe, "-o", out)
    assert result.exit_code == 1, result.output
    assert "cannot plan the merge" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml"]


def test_multi_document_validate_and_dry_run(llama, tmp_path):
    recipe = _multi(tmp_path, llama)
    result = invoke("validate", recipe)
    assert result.exit_code == 0, result.output
    assert "2 merges, in order: avg (linear), final (task_arithmetic)" in result.stdout
    dry = invoke("merge", recipe, "-o", tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "# step 'avg' (document 2) -> intermediate 'avg'" in dry.stdout
    assert "method      linear" in dry.stdout
    assert "reads the output of 'avg'" in dry.stdout
    assert not (tmp_path / "out").exists()


def test_output_of_a_named_document_is_a_warning(llama, tmp_path):
    recipe = _multi(tmp_path, llama)
    recipe.write_text(recipe.read_text().replace("name: avg\n", "name: avg\noutput: elsewhere\n"))
    result = invoke("validate", recipe)
    assert result.exit_code == 0, result.output
    assert warning_lines(result.stderr) == [
        f"warning: {recipe}: document 2 (avg): output: has no effect: a named document's "
        "output is its name"
    ]


def test_dry_run_names_the_chat_template(llama, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels: [{{model: {llama['ft_a']}, parameters: {{weight: 1}}}}]\n"
        "chat_template: auto\n",
    )
    result = invoke("merge", recipe, "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    # The demo tokenizer carries no chat template, so `auto` finds none.
    assert "chat template auto (no input model has one: none written)" in result.stdout


@pytest.mark.parametrize(
    ("docs", "needle"),
    [
        ("name: x\n{a}---\nname: x\n{a}", "has the name 'x' too"),
        ("{a}---\n{a}", "has no name (the final merge) too"),
        ("name: x\n{y}---\nname: y\n{x}", "in a circle"),
        ("name: x/y\n{a}---\n{a}", "not a usable folder name"),
    ],
)
def test_multi_document_structure_errors(docs, needle, llama, tmp_path):
    def body(model: str) -> str:
        return f"merge_method: linear\nmodels: [{{model: {model}, parameters: {{weight: 1}}}}]\n"

    text = docs.format(a=body(str(llama["ft_a"])), x=body("x"), y=body("y"))
    recipe = write_recipe(tmp_path / "m.yaml", text)
    result = invoke("validate", recipe)
    assert result.exit_code == 1
    assert needle in result.stderr


def test_multi_document_warnings_name_their_document(llama, tmp_path):
    recipe = _multi(tmp_path, llama)
    recipe.write_text(
        recipe.read_text().replace("dtype: float32\nbase_model", "dype: x\nbase_model")
    )
    result = invoke("validate", recipe)
    assert result.exit_code == 0, result.output
    assert warning_lines(result.stderr) == [
        f"warning: {recipe}: document 1: dype: has no effect (unknown key); did you mean 'dtype'?"
    ]


# ---------------------------------------------------------------------- random seed


def _dare(tmp_path: Path, llama: dict[str, Path], seed: str = "") -> Path:
    return write_recipe(
        tmp_path / f"dare{seed}.yaml",
        f"merge_method: dare_linear\ndtype: float32\nbase_model: {llama['base']}\nmodels:\n"
        f"  - {{model: {llama['ft_a']}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
        + (f"parameters: {{seed: {seed}}}\n" if seed else ""),
    )


def test_random_seed_changes_dare_deterministically(llama, tmp_path):
    recipe = _dare(tmp_path, llama)

    def run(name: str, *extra: object) -> dict[str, torch.Tensor]:
        result = invoke("merge", recipe, "-o", tmp_path / name, *extra)
        assert result.exit_code == 0, result.output
        return load_state(tmp_path / name)

    default, one, one_again, two = (
        run("d"),
        run("s1", "--random-seed", 1),
        run("s1b", "--random-seed", 1),
        run("s2", "--random-seed", 2),
    )
    name = next(n for n in default if n.endswith("mlp.down_proj.weight"))
    assert torch.equal(one[name], one_again[name])
    assert not torch.equal(one[name], two[name])
    assert not torch.equal(one[name], default[name])
    # --random-seed N stands in for the recipe's `seed: N`.
    seeded = _dare(tmp_path, llama, seed="1")
    result = invoke("merge", seeded, "-o", tmp_path / "r1")
    assert result.exit_code == 0, result.output
    assert torch.equal(load_state(tmp_path / "r1")[name], one[name])
