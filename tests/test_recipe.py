"""Recipes: mergekit-format parsing, parameter evaluation, and error reporting."""

from __future__ import annotations

import pytest
import yaml

from weightops.errors import RecipeError
from weightops.merge import get_method
from weightops.recipe import Condition, Recipe, evaluate, load_recipe, parse_recipe


def problems(text: str) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    return dict(info.value.problems)


def ev(text: str, name: str, t: float, key: str = "p"):
    """Evaluate parameter `key` of a parsed `parameters:` block."""
    return evaluate(_params(text)[key], name, t)


def _params(block: str) -> dict:
    # Parse a bare parameters block through the recipe model (structure only; the
    # method's own checks are not run).
    return Recipe.model_validate(
        {"merge_method": "linear", "models": [{"model": "m"}], "parameters": yaml.safe_load(block)}
    ).parameters


# ------------------------------------------------------------------- parsing


def test_all_forms_of_parameter_settings():
    recipe = parse_recipe("""
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: 0.5
      density: [0.2, 0.8]
  - model: b
    parameters:
      weight:
        - filter: mlp
          value: 0.3
        - value: [0.1, 0.9]
      density: {filter: self_attn, value: 0.7}
parameters:
  lambda: 1.2
  normalize: true
dtype: bfloat16
""")
    a, b = recipe.models
    assert a.parameters["weight"] == 0.5
    assert a.parameters["density"] == [0.2, 0.8]
    w = b.parameters["weight"]
    assert isinstance(w, list) and all(isinstance(c, Condition) for c in w)
    assert (w[0].filter, w[0].value) == ("mlp", 0.3)
    assert (w[1].filter, w[1].value) == (None, [0.1, 0.9])
    d = b.parameters["density"]
    assert isinstance(d, Condition) and (d.filter, d.value) == ("self_attn", 0.7)
    assert recipe.parameters == {"lambda": 1.2, "normalize": True}
    assert recipe.dtype == "bfloat16"
    assert recipe.model_paths() == ["base", "a", "b"]


def test_slices_form():
    recipe = parse_recipe("""
merge_method: slerp
slices:
  - sources:
      - model: a
        layer_range: [0, 16]
      - model: b
        layer_range: [0, 16]
    base_model: a
    parameters:
      t: [0, 0.5, 1]
""")
    (s,) = recipe.slices
    assert [src.layer_range for src in s.sources] == [(0, 16), (0, 16)]
    assert s.parameters == {"t": [0, 0.5, 1]}
    assert recipe.models is None


# ------------------------------------------------------------------ evaluate


def test_scalar_is_constant():
    assert ev("p: 0.3", "model.layers.0.mlp.up_proj.weight", 0.0) == 0.3
    assert ev("p: 0.3", "model.layers.9.mlp.up_proj.weight", 1.0) == 0.3
    assert evaluate(True, "x", 0.5) is True


@pytest.mark.parametrize(
    ("t", "want"),
    [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 0.75), (1.0, 0.5)],
)
def test_gradient_with_three_points(t, want):
    # Points at t = 0, 0.5, 1 with values 0, 1, 0.5; linear in between:
    # t = 0.25 is halfway from 0 to 1, t = 0.75 halfway from 1 to 0.5.
    assert ev("p: [0.0, 1.0, 0.5]", "any", t) == pytest.approx(want)


def test_gradient_with_two_points_and_integers():
    assert ev("p: [0, 1]", "x", 1 / 3) == pytest.approx(1 / 3)
    assert ev("p: [2, 4]", "x", 0.5) == pytest.approx(3.0)
    assert ev("p: [5]", "x", 0.7) == 5


def test_non_numeric_list_picks_an_element():
    setting = ["a", "b", "c"]
    assert evaluate(setting, "x", 0.0) == "a"
    assert evaluate(setting, "x", 0.5) == "b"
    assert evaluate(setting, "x", 1.0) == "c"
    assert evaluate([True, False], "x", 0.0) is True
    assert evaluate([True, False], "x", 1.0) is False


def test_conditions_first_match_wins():
    block = """
p:
  - filter: mlp
    value: 1
  - filter: mlp.down_proj
    value: 2
  - filter: self_attn
    value: [0, 1]
  - value: 9
"""
    assert ev(block, "model.layers.1.mlp.down_proj.weight", 0.5) == 1
    assert ev(block, "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert ev(block, "model.layers.1.self_attn.q_proj.weight", 1.0) == pytest.approx(1.0)
    assert ev(block, "model.norm.weight", 0.3) == 9


def test_condition_order_matters():
    block = """
p:
  - filter: mlp.down_proj
    value: 2
  - filter: mlp
    value: 1
"""
    assert ev(block, "model.layers.1.mlp.down_proj.weight", 0.0) == 2
    assert ev(block, "model.layers.1.mlp.up_proj.weight", 0.0) == 1


def test_star_and_missing_filter_match_everything():
    assert ev("p: [{filter: '*', value: 4}]", "anything.weight", 0.0) == 4
    assert ev("p: [{value: 5}]", "anything.weight", 0.0) == 5
    assert ev("p: {filter: '*', value: 6}", "anything.weight", 0.0) == 6
    # '*' is a wildcard, not a literal substring: it wins over later conditions.
    assert ev("p: [{filter: '*', value: 1}, {filter: mlp, value: 2}]", "mlp.x", 0.0) == 1


def test_no_matching_condition_gives_none():
    assert ev("p: [{filter: mlp, value: 1}]", "model.layers.0.self_attn.q_proj.weight", 0.0) is None
    assert ev("p: {filter: mlp, value: 1}", "model.norm.weight", 0.0) is None
    assert ev("p: {filter: mlp, value: 1}", "model.layers.0.mlp.up_proj.weight", 0.0) == 1


# --------------------------------------------------------------- error reports


def test_every_problem_reported_at_once_with_yaml_paths():
    text = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: 0.5
      densty: 0.5
  - model: b
    parameters:
      weight: 0.5
      density: 1.5
  - model: c
parameters:
  lambda: abc
"""
    found = problems(text)
    # mergekit ignores the misspelt `densty`: a warning, reported beside the problems.
    assert "density must be <= 1" in found["models[1].parameters.density"]
    missing = [msg for path, msg in found.items() if path.startswith("models[2]")]
    assert len(missing) == 1 and "'weight'" in missing[0] and "'c'" in missing[0]
    assert "must be a number" in found["parameters.lambda"]
    assert len(found) == 3
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    assert dict(info.value.warnings) == {
        "models[0].parameters.densty": (
            "has no effect: ties takes no parameter 'densty'; did you mean 'density'?"
        )
    }


def test_missing_per_model_weight_path():
    found = problems("""
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 0.5}
  - model: c
""")
    assert list(found) == ["models[1].parameters"]


def test_structural_problems_reported_together():
    with pytest.raises(RecipeError) as info:
        parse_recipe("""
merge_method: linear
merge_methd: linear
models:
  - modle: a
dtype: float8
""")
    paths = [p for p, _ in info.value.problems]
    assert "dtype" in paths
    assert "models[0].model" in paths  # `modle` is dropped, as mergekit drops it
    # mergekit ignores unknown keys; they are warnings, reported with the problems.
    warned = dict(info.value.warnings)
    assert set(warned) == {"merge_methd", "models[0].modle"}
    assert "did you mean 'merge_method'?" in warned["merge_methd"]
    assert "did you mean 'model'?" in warned["models[0].modle"]


def test_unknown_method_suggests_closest():
    found = problems("merge_method: linaer\nmodels: [{model: a}]\n")
    assert "did you mean 'linear'?" in found["merge_method"]
    assert "slerp" in found["merge_method"]  # the valid ones are listed
    with pytest.raises(RecipeError, match="did you mean 'task_arithmetic'"):
        get_method("task_arithmetc")


def test_no_suggestion_for_unrelated_name():
    found = problems("merge_method: zzzzzz\nmodels: [{model: a}]\n")
    assert "did you mean" not in found["merge_method"]


@pytest.mark.parametrize(
    "body",
    [
        "models: [{model: a, parameters: {weight: 1}}]\nslices: [{sources: [{model: a, layer_range: [0, 2]}]}]\n",
        "parameters: {weight: 1}\n",
    ],
    ids=["both", "neither"],
)
def test_models_and_slices_exactly_one(body):
    found = problems("merge_method: linear\n" + body)
    assert "exactly one of 'models', 'slices' or 'modules'" in found[""]


def test_slerp_needs_base_model():
    found = problems(
        "merge_method: slerp\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5}\n"
    )
    assert "needs a base_model" in found["base_model"]


def test_slerp_takes_one_model_besides_base():
    found = problems("""
merge_method: slerp
base_model: base
models: [{model: base}, {model: a}, {model: b}]
parameters: {t: 0.5}
""")
    assert "at most 1" in found["models"]


def test_slerp_needs_t():
    found = problems("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n")
    assert "'t'" in found["parameters"]


def test_model_stock_needs_two_fine_tunes():
    found = problems(
        "merge_method: model_stock\nbase_model: base\nmodels: [{model: base}, {model: a}]\n"
    )
    assert "at least 2" in found["models"]
    assert "(got 1)" in found["models"]
    parse_recipe("merge_method: model_stock\nbase_model: base\nmodels: [{model: a}, {model: b}]\n")


def test_shared_parameter_under_a_model_is_a_warning():
    # mergekit reads whole-merge parameters only from the top-level or slice blocks,
    # so a model's `lambda` is ignored there: a warning, an error with strict.
    text = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 1, lambda: 0.5}
"""
    warned = dict(parse_recipe(text).warnings)
    assert list(warned) == ["models[0].parameters.lambda"]
    assert "whole merge" in warned["models[0].parameters.lambda"]
    assert "did you mean 'parameters.lambda'?" in warned["models[0].parameters.lambda"]
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, strict=True)
    assert [p for p, _ in info.value.problems] == ["models[0].parameters.lambda"]


def test_per_model_parameter_may_be_global():
    recipe = parse_recipe("""
merge_method: ties
base_model: base
models: [{model: a}, {model: b}]
parameters: {weight: 0.5, density: 0.5}
""")
    assert recipe.parameters["weight"] == 0.5


def test_an_unlisted_base_model_joins_the_inputs_of_a_method_without_base():
    # As in mergekit: linear then needs a weight for it too.
    found = problems(
        "merge_method: linear\nbase_model: z\nmodels: [{model: a, parameters: {weight: 1}}]\n"
    )
    assert "joins the inputs" in found["base_model"] and "'weight'" in found["base_model"]
    # With a global weight it is one more input.
    ok = parse_recipe(
        "merge_method: linear\nbase_model: z\nparameters: {weight: 1}\nmodels: [{model: a}]\n"
    )
    assert ok.base_model == "z"


def test_base_model_needs_no_per_model_weight():
    parse_recipe("""
merge_method: task_arithmetic
base_model: base
models:
  - model: base
  - model: a
    parameters: {weight: 1}
""")


def test_load_recipe_reports_missing_model_folders(tmp_path):
    (tmp_path / "a").mkdir()
    path = tmp_path / "r.yaml"
    path.write_text(
        "merge_method: ties\nbase_model: nowhere\nmodels: [{model: a, parameters: {weight: 1}}, {model: gone, parameters: {weight: 1}}]\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    found = dict(info.value.problems)
    assert set(found) == {"base_model", "models[1].model"}
    assert load_recipe(path, check_paths=False).base_model == "nowhere"


# -------------------------------------------------------------------- to_yaml


def test_to_yaml_round_trips():
    text = """
merge_method: dare_ties
base_model: base
models:
  - model: a
    parameters:
      weight: [0.2, 0.6]
      density: {filter: mlp, value: 0.5}
  - model: b
    parameters:
      weight:
        - filter: self_attn
          value: [0, 0.5, 1]
        - value: 0.4
      density: 0.7
parameters:
  lambda: 1.1
  seed: 3
  normalize: true
dtype: bfloat16
out_dtype: float32
tokenizer_source: base
"""
    first = parse_recipe(text)
    second = parse_recipe(first.to_yaml())
    assert second == first
    assert second.to_yaml() == first.to_yaml()


def test_to_yaml_round_trips_slices():
    first = parse_recipe("""
merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 4]}]
  - sources: [{model: b, layer_range: [2, 4], parameters: {scale: 0.5}}]
dtype: float32
""")
    second = parse_recipe(first.to_yaml())
    assert second == first
    assert second.slices[1].sources[0].layer_range == (2, 4)
