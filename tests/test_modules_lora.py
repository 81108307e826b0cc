"""Recipe `modules:`, `residual_weight` (accepted, no effect) and `MODEL+LORA` references, end to end.

Merges run through `weightops merge`; every output tensor is compared with a value
computed here with numpy from the inputs (read with the safetensors library), and
LoRA updates with an independent W + s·B@A (and, when peft is installed, with peft's
own merge_and_unload).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_state
from safetensors.torch import save_file
from typer.testing import CliRunner

from weightops.cli import app
from weightops.compat import causal_lm
from weightops.engine.modules import module_of
from weightops.engine.plan import build_plan
from weightops.engine.run import RunOptions, execute
from weightops.recipe import load_recipe

TEXT_LAYERS, VISION_LAYERS = 2, 3


def invoke(args: list) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def run_merge(tmp_path: Path, recipe: dict, name: str = "out") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / name
    result = invoke(["merge", path, "-o", out, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def fails(tmp_path: Path, recipe: dict, command: str = "validate") -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    args = [command, path] + (["-o", tmp_path / "never", "--dry-run"] if command == "merge" else [])
    result = invoke(args)
    assert result.exit_code != 0, result.output
    return " ".join(result.output.split())


def numpy_state(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_state(folder).items()}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize(
    ("name", "module"),
    [
        # LLaVA as transformers saves it (legacy layout) and as it builds it since 2025.
        ("language_model.model.layers.1.mlp.up_proj.weight", "text_decoder"),
        ("language_model.lm_head.weight", "text_decoder"),
        ("vision_tower.encoder.layers.0.self_attn.q_proj.weight", "vision_tower"),
        ("vision_tower.vision_model.post_layernorm.weight", "vision_tower"),
        ("multi_modal_projector.linear_1.weight", "multi_modal_projector"),
        ("model.language_model.embed_tokens.weight", "text_decoder"),
        ("model.vision_tower.transformer.layers.0.feed_forward.down_proj.weight", "vision_tower"),
        ("model.multi_modal_projector.norm.weight", "multi_modal_projector"),
        ("lm_head.weight", "text_decoder"),
        # Qwen2-VL / Qwen3-VL: the patch mergers belong to the projector.
        ("model.layers.0.self_attn.q_proj.weight", "text_decoder"),
        ("visual.blocks.0.attn.qkv.weight", "vision_tower"),
        ("visual.merger.mlp.0.weight", "multi_modal_projector"),
        ("model.visual.deepstack_merger_list.1.norm.weight", "multi_modal_projector"),
        ("model.visual.patch_embed.proj.weight", "vision_tower"),
        # Llama 4, audio towers, a plain text model.
        ("vision_model.model.layers.0.mlp.fc1.weight", "vision_tower"),
        ("audio_tower.layers.2.fc1.weight", "audio_tower"),
        ("transformer.h.0.attn.c_attn.weight", "text_decoder"),
    ],
)
def test_module_of_tensor_names(name, module):
    assert module_of(name) == module


def _tiny_llava(folder: Path, seed: int) -> Path:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    vision = CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        projection_dim=8,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(
        LlavaConfig(text_config=text, vision_config=vision, image_token_index=63)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava")
    return {k: _tiny_llava(root / k, seed) for seed, k in enumerate(["base", "ft_a", "ft_b"])}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return next(
        (int(parts[i + 1]) for i, p in enumerate(parts[:-1]) if p == "layers"),
        None,
    )


def test_modules_merge_each_part_with_its_own_method(llava, tmp_path):
    base, a, b = (str(llava[k]) for k in ("base", "ft_a", "ft_b"))
    recipe = {
        "merge_method": "linear",
        "base_model": base,
        "parameters": {"normalize": True},
        "modules": {
            "text_decoder": {
                "merge_method": "task_arithmetic",
                "models": [
                    {"model": a, "parameters": {"weight": 0.7}},
                    {"model": b, "parameters": {"weight": 0.3}},
                ],
            },
            # A gradient over the tower's own 3 layers: ft_a weighs 1, 0.5, 0 at its
            # layers 0, 1, 2 (and 1 outside the layers).
            "vision_tower": {
                "models": [
                    {"model": a, "parameters": {"weight": [1.0, 0.0]}},
                    {"model": b, "parameters": {"weight": 1.0}},
                ],
            },
            "multi_modal_projector": {
                "merge_method": "passthrough",
                "models": [{"model": b}],
            },
        },
    }
    out = run_merge(tmp_path, recipe)
    B, A, Bb = (numpy_state(llava[k]) for k in ("base", "ft_a", "ft_b"))
    want = {}
    for name in B:
        if name.startswith("multi_modal_projector."):
            want[name] = Bb[name]
        elif name.startswith("vision_tower."):
            layer = _layer(name)
            wa = 1.0 if layer is None else 1.0 - layer / (VISION_LAYERS - 1)
            want[name] = (wa * A[name] + Bb[name]) / (wa + 1.0)
        else:
            want[name] = B[name] + 0.7 * (A[name] - B[name]) + 0.3 * (Bb[name] - B[name])
    assert_close(numpy_state(out), want)
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] == VISION_LAYERS
    card = (out / "README.md").read_text()
    assert "text_decoder `task_arithmetic`" in card and "vision_tower `linear`" in card


def test_modules_slice_the_vision_tower(llava, tmp_path):
    from transformers import LlavaForConditionalGeneration

    base, a, b = (str(llava[k]) for k in ("base", "ft_a", "ft_b"))
    recipe = {
        "merge_method": "passthrough",
        "modules": {
            "text_decoder": {"models": [{"model": base}]},
            "vision_model": {  # mergekit's alias
                "slices": [
                    {"sources": [{"model": a, "layer_range": [0, 2]}]},
                    {"sources": [{"model": b, "layer_range": [1, 3]}]},
                ]
            },
            "multi_modal_projector": {"models": [{"model": a}]},
        },
    }
    out = run_merge(tmp_path, recipe)
    B, A, Bb = (numpy_state(llava[k]) for k in ("base", "ft_a", "ft_b"))
    # Output vision layers 0, 1 are ft_a's 0, 1; layers 2, 3 are ft_b's 1, 2; the
    # tower's embeddings come from the first slice, its final norm from the last.
    want = {}
    for name in B:
        layer = _layer(name)
        if name.startswith("multi_modal_projector."):
            want[name] = A[name]
        elif not name.startswith("vision_tower."):
            want[name] = B[name]
        elif layer is None:
            first = "embeddings" in name or "pre_layrnorm" in name
            want[name] = (A if first else Bb)[name]
        elif layer < 2:
            want[name] = A[name]
            want[name.replace(f"layers.{layer}.", f"layers.{layer + 1}.")] = Bb[name]
            if layer == 1:
                want[name.replace("layers.1.", "layers.3.")] = Bb[
                    name.replace("layers.1.", "layers.2.")
                ]
    assert_close(numpy_state(out), want)
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] == 4
    assert config["text_config"]["num_hidden_layers"] == TEXT_LAYERS
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    layers = {_layer(n) for n in model.state_dict() if "vision_tower" in n}
    assert layers == {None, 0, 1, 2, 3}


def test_dry_run_and_validate_name_the_modules(llava, tmp_path):
    base, a = str(llava["base"]), str(llava["ft_a"])
    recipe = {
        "merge_method": "linear",
        "modules": {
            "text_decoder": {"models": [{"model": a, "parameters": {"weight": 1.0}}]},
            "vision_tower": {"merge_method": "passthrough", "models": [{"model": base}]},
            "multi_modal_projector": {"models": [{"model": base, "parameters": {"weight": 1}}]},
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = invoke(["validate", path])
    assert result.exit_code == 0, result.output
    assert "text_decoder linear, vision_tower passthrough" in result.output
    result = invoke(["merge", path, "-o", tmp_path / "o", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "module      vision_tower: passthrough" in result.output
    line = next(
        s
        for s in result.output.splitlines()
        # transformers releases name LLaVA's tower tensors in two layouts.
        if "vision_tower." in s.split(" ")[0] and ".post_layernorm." in s.split(" ")[0]
    )
    assert "passthrough(" in line
    assert not (tmp_path / "o").exists()


def test_module_recipe_problems(llava, tmp_path):
    a = str(llava["ft_a"])
    one = {"models": [{"model": a, "parameters": {"weight": 1}}]}
    found = fails(
        tmp_path,
        {
            "merge_method": "linear",
            "parameters": {"normalize": True, "density": 0.5},
            "models": one["models"],
            "modules": {
                "vison_tower": one,
                "text_decoder": {
                    **one,
                    "slices": [{"sources": [{"model": a, "layer_range": [0, 1]}]}],
                },
                "default": one,
                "multi_modal_projector": {"merge_method": "tyes", "models": one["models"]},
            },
        },
    )
    assert "give exactly one of 'models', 'slices' or 'modules'" in found
    assert "modules.vison_tower: unknown module 'vison_tower'" in found
    assert "modules.text_decoder: give exactly one of 'models' or 'slices'" in found
    assert "modules.default: is the same module as modules.text_decoder" in found
    assert "modules.multi_modal_projector.merge_method: unknown merge method 'tyes'" in found
    # A top-level parameter mergekit would ignore is one warning, where it is written.
    assert found.count("parameters.density: has no effect: linear takes no parameter") == 1


def test_top_level_parameters_reach_only_methods_that_have_them(llava, tmp_path):
    a, b = str(llava["ft_a"]), str(llava["ft_b"])
    modules = {
        name: {"merge_method": "passthrough", "models": [{"model": a}]}
        for name in ("text_decoder", "vision_tower")
    }
    # ties' density is inherited by a ties module; the passthrough modules ignore it.
    modules["multi_modal_projector"] = {
        "base_model": b,
        "models": [{"model": a, "parameters": {"weight": 1.0}}],
    }
    recipe = {"merge_method": "ties", "parameters": {"density": 1.0}, "modules": modules}
    out = run_merge(tmp_path, recipe)
    A, Bb = numpy_state(llava["ft_a"]), numpy_state(llava["ft_b"])
    # ties with density 1, one model, weight 1: the base plus the whole task vector.
    for name in A:
        np.testing.assert_allclose(numpy_state(out)[name], A[name], rtol=1e-5, atol=1e-6)
    assert Bb  # the base was read
    # A key mergekit would ignore: a warning, and an error with --strict.
    recipe = {"merge_method": "ties", "parameters": {"densty": 1.0}, "modules": modules}
    path = tmp_path / "warn.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = invoke(["validate", path])
    assert result.exit_code == 0, result.output
    assert "parameters.densty: has no effect: ties takes no parameter 'densty'" in result.stderr
    assert invoke(["validate", path, "--strict"]).exit_code != 0
    recipe["modules"]["multi_modal_projector"] = modules["text_decoder"]
    path.write_text(yaml.safe_dump(recipe))
    result = invoke(["validate", path])
    assert result.exit_code == 0, result.output
    assert "parameters.densty: has no effect" in result.stderr


def test_modules_must_cover_the_model_and_slices_need_modules(llava, tmp_path):
    a = str(llava["ft_a"])
    found = fails(
        tmp_path,
        {
            "merge_method": "passthrough",
            "modules": {"text_decoder": {"models": [{"model": a}]}},
        },
        command="merge",
    )
    assert "has a vision_tower" in found and "add modules.vision_tower" in found
    assert "add modules.multi_modal_projector" in found
    found = fails(
        tmp_path,
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]}],
        },
        command="merge",
    )
    assert "has several modules (text_decoder, vision_tower, multi_modal_projector)" in found
    assert "under `modules:`" in found


# --------------------------------------------------------------------------- residual_weight


def test_residual_weight_is_accepted_with_a_warning_and_changes_nothing(llama, tmp_path):
    """mergekit declares residual_weight on a slice and never reads it: the merge is the
    same as without it, and each occurrence (slice or source) is one warning."""
    a, b = str(llama["ft_a"]), str(llama["ft_b"])
    both = {"parameters": {"weight": 1.0}}
    plain = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": a, "layer_range": [0, 2], **both},
                    {"model": b, "layer_range": [0, 2], **both},
                ]
            },
            {
                "sources": [
                    {"model": a, "layer_range": [1, 3], **both},
                    {"model": b, "layer_range": [1, 3], **both},
                ]
            },
        ],
    }
    weighted = json.loads(json.dumps(plain))
    weighted["slices"][1]["residual_weight"] = 0.25
    weighted["slices"][0]["sources"][0]["residual_weight"] = 0.5
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(weighted, sort_keys=False))
    result = invoke(["merge", path, "-o", tmp_path / "w", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "slices[1].residual_weight: has no effect" in result.stderr
    assert "slices[0].sources[0].residual_weight: has no effect" in result.stderr
    out = run_merge(tmp_path, plain, "plain")
    A, Bb = numpy_state(llama["ft_a"]), numpy_state(llama["ft_b"])
    want = {}
    for name in A:
        layer = _layer(name)
        mean = (A[name] + Bb[name]) / 2
        if layer is None or layer < 2:
            want[name] = mean
        if layer is not None and 1 <= layer < 3:
            want[name.replace(f"layers.{layer}.", f"layers.{layer + 1}.")] = mean
    assert_close(numpy_state(out), want)
    assert_close(numpy_state(tmp_path / "w"), want)
    strict = invoke(["validate", path, "--strict"])
    assert strict.exit_code != 0 and "residual_weight" in strict.output


# --------------------------------------------------------------------------- LoRA


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.fixture(scope="module")
def llama_adapter(llama, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A LoRA adapter on the tiny llama, and the adapted tensors it must produce:
    q_proj of layers 0-1 (r 4, alpha 8), v_proj of layer 1 (r 2 by rank_pattern, alpha
    3 by alpha_pattern), the embedding (lora_embedding_A/B) and lm_head whole
    (modules_to_save)."""
    base = numpy_state(llama["base"])
    pre = "base_model.model."
    tensors, want = {}, {}
    for i, layer in enumerate((0, 1)):
        stem = f"model.layers.{layer}.self_attn.q_proj"
        a, b = _randn(4, 64, seed=10 + i), _randn(64, 4, seed=20 + i)
        tensors |= {f"{pre}{stem}.lora_A.weight": a, f"{pre}{stem}.lora_B.weight": b}
        want[f"{stem}.weight"] = base[f"{stem}.weight"] + 8 / 4 * (b.double() @ a.double()).numpy()
    stem = "model.layers.1.self_attn.v_proj"
    a, b = _randn(2, 64, seed=30), _randn(32, 2, seed=31)
    tensors |= {f"{pre}{stem}.lora_A.weight": a, f"{pre}{stem}.lora_B.weight": b}
    want[f"{stem}.weight"] = base[f"{stem}.weight"] + 3 / 2 * (b.double() @ a.double()).numpy()
    a, b = _randn(4, 320, seed=40), _randn(64, 4, seed=41)
    tensors |= {
        f"{pre}model.embed_tokens.lora_embedding_A": a,
        f"{pre}model.embed_tokens.lora_embedding_B": b,
    }
    want["model.embed_tokens.weight"] = (
        base["model.embed_tokens.weight"] + 8 / 4 * (b.double() @ a.double()).numpy().T
    )
    head = _randn(320, 64, seed=50)
    tensors[f"{pre}lm_head.weight"] = head
    want["lm_head.weight"] = head.double().numpy()
    config = {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"layers.1.self_attn.v_proj": 2},
        "alpha_pattern": {"v_proj": 3},
        "modules_to_save": ["lm_head"],
    }
    folder = write_adapter(tmp_path_factory.mktemp("adapter") / "a", config, tensors)
    return folder, want


def test_lora_adapter_merged_on_read(llama, llama_adapter, tmp_path):
    folder, adapted = llama_adapter
    ref = f"{llama['base']}+{folder}"
    out = run_merge(tmp_path, {"merge_method": "passthrough", "models": [{"model": ref}]})
    want = numpy_state(llama["base"]) | adapted
    assert_close(numpy_state(out), want)
    assert f"with the LoRA adapter `{folder}` merged in" in (out / "README.md").read_text()
    result = invoke(["merge", tmp_path / "out.yaml", "-o", tmp_path / "dry", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"+ LoRA {folder} (4 adapted, 1 replaced)" in result.output


def test_lora_input_in_a_merge_read_in_row_blocks(llama, llama_adapter, tmp_path):
    folder, adapted = llama_adapter
    ref = f"{llama['base']}+{folder}"
    text = yaml.safe_dump(
        {
            "merge_method": "linear",
            "models": [
                {"model": ref, "parameters": {"weight": 1.0}},
                {"model": str(llama["ft_a"]), "parameters": {"weight": 3.0}},
            ],
        }
    )
    path = tmp_path / "r.yaml"
    path.write_text(text)
    plan = build_plan(load_recipe(path), tmp_path)
    # Small pieces: the adapter's rows (and the embedding's columns of A) are cut to fit.
    execute(plan, tmp_path / "out", RunOptions(device="cpu", progress=False, chunk_elements=200))
    base, ft = numpy_state(llama["base"]), numpy_state(llama["ft_a"])
    want = {n: (adapted.get(n, base[n]) + 3 * ft[n]) / 4 for n in base}
    assert_close(numpy_state(tmp_path / "out"), want)


def test_lora_fan_in_fan_out_bias_and_rslora_on_gpt2(families, tmp_path):
    gpt2 = families["gpt2"]["base"]
    base = numpy_state(gpt2)
    pre = "base_model.model."
    tensors = {}
    # c_attn is a Conv1D stored [in 64, out 192]; c_proj is square, so the config's
    # fan_in_fan_out decides its orientation. With rslora, s = alpha / √r = 8 / 2.
    for stem, fan_out in (
        ("transformer.h.0.attn.c_attn", 192),
        ("transformer.h.1.attn.c_proj", 64),
    ):
        tensors[f"{pre}{stem}.lora_A.weight"] = _randn(4, 64, seed=len(tensors))
        tensors[f"{pre}{stem}.lora_B.weight"] = _randn(fan_out, 4, seed=len(tensors) + 1)
    tensors[f"{pre}transformer.h.0.attn.c_attn.lora_B.bias"] = _randn(192, seed=99)
    config = {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "fan_in_fan_out": True,
        "lora_bias": True,
    }
    folder = write_adapter(tmp_path / "adapter", config, tensors)
    out = run_merge(
        tmp_path, {"merge_method": "passthrough", "models": [{"model": f"{gpt2}+{folder}"}]}
    )
    s = 8 / math.sqrt(4)
    want = dict(base)
    for stem in ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj"):
        a = tensors[f"{pre}{stem}.lora_A.weight"].double().numpy()
        b = tensors[f"{pre}{stem}.lora_B.weight"].double().numpy()
        want[f"{stem}.weight"] = base[f"{stem}.weight"] + s * (b @ a).T
    bias = "transformer.h.0.attn.c_attn.bias"
    want[bias] = (
        base[bias] + s * tensors[f"{pre}{bias.replace('.bias', '.lora_B.bias')}"].double().numpy()
    )
    assert_close(numpy_state(out), want)


def test_lora_refusals(llama, tmp_path):
    base = str(llama["base"])
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    ok = {
        f"{pre}.lora_A.weight": _randn(4, 64, seed=1),
        f"{pre}.lora_B.weight": _randn(64, 4, seed=2),
    }

    def recipe(folder: Path | str) -> dict:
        return {"merge_method": "passthrough", "models": [{"model": f"{base}+{folder}"}]}

    dora = write_adapter(tmp_path / "dora", {"r": 4, "lora_alpha": 8, "use_dora": True}, ok)
    assert "DoRA (weight-decomposed LoRA) adapters are not supported" in fails(
        tmp_path, recipe(dora)
    )
    ia3 = write_adapter(tmp_path / "ia3", {"peft_type": "IA3", "r": 4, "lora_alpha": 8}, ok)
    assert "peft_type 'IA3' is not supported" in fails(tmp_path, recipe(ia3))
    assert "LoRA adapter 'nowhere' not found" in fails(tmp_path, recipe("nowhere"))
    assert "one '+' between two non-empty paths" in fails(tmp_path, recipe("a+b"))
    magnitude = {**ok, f"{pre}.lora_magnitude_vector": torch.ones(64)}
    dora_weights = write_adapter(tmp_path / "m", {"r": 4, "lora_alpha": 8}, magnitude)
    assert "DoRA adapters (lora_magnitude_vector) are not supported" in fails(
        tmp_path, recipe(dora_weights), command="merge"
    )
    wrong = {
        f"{pre}.lora_A.weight": _randn(4, 64, seed=1),
        f"{pre}.lora_B.weight": _randn(48, 4, seed=2),
        "base_model.model.model.layers.0.self_attn.nope.lora_A.weight": _randn(4, 64, seed=3),
        "base_model.model.model.layers.0.self_attn.nope.lora_B.weight": _randn(64, 4, seed=4),
        "base_model.model.model.layers.1.conv.lora_A.weight": torch.zeros(4, 64, 3),
        "base_model.model.model.layers.1.conv.lora_B.weight": torch.zeros(64, 4, 1),
    }
    bad = write_adapter(tmp_path / "bad", {"r": 4, "lora_alpha": 8}, wrong)
    found = fails(tmp_path, recipe(bad), command="merge")
    assert "lora_B @ lora_A is [48, 64] but 'model.layers.0.self_attn.q_proj.weight'" in found
    assert (
        "adapts 'model.layers.0.self_attn.nope.weight', which" in found and "does not have" in found
    )
    assert "LoRA on layers other than linear and embedding" in found
    rank = write_adapter(tmp_path / "rank", {"r": 8, "lora_alpha": 8}, ok)
    assert "do not have rank r=8" in fails(tmp_path, recipe(rank), command="merge")


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_lora_matches_peft_merge_and_unload(llama, tmp_path):
    peft = pytest.importorskip("peft")
    model = causal_lm(llama["base"], torch.float32)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2},
        modules_to_save=["lm_head"],
        init_lora_weights=False,  # random B too, so every update is non-zero
    )
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.double().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    out = run_merge(
        tmp_path,
        {
            "merge_method": "passthrough",
            "models": [{"model": f"{llama['base']}+{tmp_path / 'adapter'}"}],
        },
    )
    got = numpy_state(out)
    assert sorted(got) == sorted(merged)
    for name, value in merged.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    assert not np.allclose(got["lm_head.weight"], numpy_state(llama["base"])["lm_head.weight"])
