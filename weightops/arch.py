"""Tensor name -> (layer index, role), by rule rather than one table per model.

Transformer checkpoints name their tensors after a handful of conventions: decoder
blocks live under `layers.N.` (Llama, Mistral, Qwen2/3, Gemma/Gemma2, Phi-3, GPT-NeoX),
`h.N.` (GPT-2, Falcon, BLOOM) or `blocks.N.`; the parts inside a block have a small set
of names. A few regular expressions cover them all, and anything unrecognised still gets
its layer index and the role "other", so merging works on unknown families too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")

# (role, pattern on the part of the name after the layer prefix, or the whole name)
_ROLES: list[tuple[str, re.Pattern[str]]] = [
    (role, re.compile(p))
    for role, p in [
        ("embed", r"(?:^|\.)(?:embed_tokens|wte|embed_in|word_embeddings|tok_embeddings)\.weight$"),
        ("pos_embed", r"(?:^|\.)(?:wpe|embed_positions)\.weight$"),
        ("lm_head", r"^(?:lm_head|embed_out|output)\.weight$"),
        ("attn_qkv", r"(?:qkv_proj|c_attn|query_key_value|Wqkv)\.(?:weight|bias)$"),
        ("attn_q", r"(?:q_proj|query)\.(?:weight|bias)$"),
        ("attn_k", r"(?:k_proj|key)\.(?:weight|bias)$"),
        ("attn_v", r"(?:v_proj|value)\.(?:weight|bias)$"),
        (
            "attn_o",
            r"(?:o_proj|attn\.c_proj|attention\.dense|self_attn\.dense|out_proj)\.(?:weight|bias)$",
        ),
        ("mlp_gate_up", r"gate_up_proj\.(?:weight|bias)$"),
        ("mlp_gate", r"(?:gate_proj|w1)\.(?:weight|bias)$"),
        ("mlp_up", r"(?:up_proj|c_fc|dense_h_to_4h|fc1|w3)\.(?:weight|bias)$"),
        ("mlp_down", r"(?:down_proj|mlp\.c_proj|dense_4h_to_h|fc2|w2)\.(?:weight|bias)$"),
        ("qk_norm", r"(?:q_norm|k_norm|q_layernorm|k_layernorm)\.(?:weight|bias)$"),
        ("norm", r"(?:norm|layernorm|ln_\d|ln_f|ln)[^.]*\.(?:weight|bias)$"),
    ]
]


# Roles of the linear projections inside a decoder block (what quantizers compress).
LINEAR_ROLES = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_qkv",
    "attn_o",
    "mlp_gate",
    "mlp_up",
    "mlp_gate_up",
    "mlp_down",
)


def is_block_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D weight of a linear projection inside a decoder block."""
    r = describe(name)
    return (
        r.layer is not None
        and r.role in LINEAR_ROLES
        and name.endswith(".weight")
        and len(shape) == 2
    )


@dataclass(frozen=True)
class TensorRole:
    layer: int | None
    role: str


def describe(name: str) -> TensorRole:
    """Layer index (None outside decoder blocks) and role of a tensor name."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    for role, pattern in _ROLES:
        if pattern.search(name):
            if role == "lm_head" and layer is not None:
                continue
            return TensorRole(layer, role)
    return TensorRole(layer, "other")


def rename_layer(name: str, new_index: int) -> str:
    """The same tensor name in decoder block `new_index` (for slices / frankenmerges)."""
    return _LAYER.sub(lambda m: m.group(0).replace(m.group(1), str(new_index)), name, count=1)


def embedding_name(names: Iterable[str]) -> str | None:
    return next((n for n in names if describe(n).role == "embed"), None)


def tied_lm_head_name(names: Iterable[str], config: dict[str, Any]) -> str | None:
    """The lm_head name a tied checkpoint omits, or None when nothing is tied."""
    names = list(names)
    if not config.get("tie_word_embeddings", True) or embedding_name(names) is None:
        return None
    if any(describe(n).role == "lm_head" for n in names):
        return None
    return "embed_out.weight" if config.get("model_type") == "gpt_neox" else "lm_head.weight"


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal configs nest it)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def num_layers(config: dict[str, Any], names: Iterable[str] = ()) -> int:
    """Decoder depth from the config, else from the highest layer index in the names."""
    cfg = text_config(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    layers = [r.layer for r in map(describe, names) if r.layer is not None]
    return max(layers) + 1 if layers else 0


def layer_count_key(config: dict[str, Any]) -> str | None:
    cfg = text_config(config)
    return next(
        (k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in cfg), None
    )


def family(config: dict[str, Any]) -> str:
    """A readable family name: the config's model_type, or 'unknown'."""
    return str(config.get("model_type") or text_config(config).get("model_type") or "unknown")


def writes_residual(name: str) -> bool:
    """A tensor of a block's attention output or MLP down projection: what the block
    adds to the residual stream is linear in it (weight and bias)."""
    r = describe(name)
    return r.layer is not None and r.role in ("attn_o", "mlp_down")


def normalizes_block_output(names: Iterable[str]) -> str | None:
    """The name of a norm applied to a block's MLP output before the residual add
    (Gemma 2/3, OLMo 2), which undoes any scaling of the projections; else None."""
    return next((n for n in names if "post_feedforward_layernorm" in n), None)
