"""Tensor-name rules against the names transformers itself gives each family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from weightops.arch import describe, num_layers, rename_layer, tied_lm_head_name

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=3,
    vocab_size=64,
    max_position_embeddings=64,
)
CONFIGS = {
    "llama": SMALL,
    "mistral": SMALL,
    "qwen2": SMALL,
    "qwen3": dict(SMALL, head_dim=8),
    "gemma": dict(SMALL, head_dim=8),
    "gemma2": dict(SMALL, head_dim=8),
    "phi3": dict(SMALL, pad_token_id=0),
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, vocab_size=64, n_positions=64),
    "gpt_neox": dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=64,
        max_position_embeddings=64,
    ),
}
# Which roles each block must have: every weight inside a decoder block is recognised.
BLOCK_ROLES = {
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_qkv",
    "attn_o",
    "mlp_gate",
    "mlp_up",
    "mlp_gate_up",
    "mlp_down",
    "norm",
    "qk_norm",
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request: pytest.FixtureRequest) -> tuple[str, dict, list[str]]:
    name = request.param
    config = AutoConfig.for_model(name, **CONFIGS[name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return name, config.to_dict(), list(model.state_dict())


def test_every_block_tensor_has_its_layer_and_a_known_role(family):
    name, config, names = family
    per_layer = {}
    for n in names:
        role = describe(n)
        if role.layer is None:
            continue
        assert role.role in BLOCK_ROLES, f"{name}: {n} -> {role.role}"
        per_layer.setdefault(role.layer, set()).add(n.replace(f".{role.layer}.", ".N."))
    assert sorted(per_layer) == [0, 1, 2], name
    # Every layer holds the same set of tensors once the index is factored out.
    assert per_layer[0] == per_layer[1] == per_layer[2]
    assert num_layers(config, names) == 3


def test_tensors_outside_blocks_are_embeddings_norms_or_head(family):
    name, _, names = family
    roles = {describe(n).role for n in names if describe(n).layer is None}
    assert "embed" in roles, name
    assert "norm" in roles, name
    assert roles <= {"embed", "pos_embed", "norm", "lm_head"}, (name, roles)


def test_rename_layer_changes_only_the_block_index():
    assert (
        rename_layer("model.layers.3.mlp.up_proj.weight", 11)
        == "model.layers.11.mlp.up_proj.weight"
    )
    assert (
        rename_layer("transformer.h.10.attn.c_attn.weight", 2)
        == "transformer.h.2.attn.c_attn.weight"
    )
    # Digits elsewhere in the name are left alone.
    assert rename_layer("model.layers.1.mlp.fc1.weight", 7) == "model.layers.7.mlp.fc1.weight"


def test_generic_fallback_for_unknown_families():
    r = describe("backbone.blocks.5.mixer.weird_proj.weight")
    assert (r.layer, r.role) == (5, "other")
    assert describe("something.else").layer is None


def test_tied_head_name():
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    assert tied_lm_head_name(names, {"tie_word_embeddings": True}) == "lm_head.weight"
    assert tied_lm_head_name(names, {"tie_word_embeddings": False}) is None
    assert tied_lm_head_name([*names, "lm_head.weight"], {}) is None
    neox = ["gpt_neox.embed_in.weight"]
    assert tied_lm_head_name(neox, {"model_type": "gpt_neox"}) == "embed_out.weight"
