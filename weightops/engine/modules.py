"""The modules of a multimodal checkpoint, told apart by rule from tensor names.

A recipe's `modules:` merges each part of a multimodal model on its own (its own
inputs, method, base model and parameters), under the names mergekit uses:

    text_decoder            the language model: everything not claimed below
    vision_tower            `vision_tower.`, `vision_model.`, `visual.`, `vision_encoder.`
    audio_tower             `audio_tower.`, `audio_model.`, `audio_encoder.`
    multi_modal_projector   `multi_modal_projector.`, `mm_projector.`, and the patch
                            mergers inside a vision tower (`visual.merger.`,
                            `visual.deepstack_merger_list.`, as in Qwen2/2.5/3-VL)

The prefix is the first part of the name, or the second after a leading `model.`
(transformers moved the towers under `model.` in 2025; both layouts are read). This
covers LLaVA and LLaVA-NeXT, Mistral 3, Gemma 3, Llama 4, Qwen2-VL/2.5-VL/3-VL and
similar layouts without one table per architecture; mergekit's `vision_model` (its
name for Llama 4's tower) and `default` (a text-only model) are accepted as aliases.

Each module has its own depth, for gradients over layers and for `slices`: the layer
count of its sub-config (`text_config`, `vision_config`, `audio_config`: one of
num_hidden_layers, depth, num_layers, encoder_layers, …), else one past the highest
block index among its tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from weightops.arch import describe, layer_count_key, num_layers, text_config

MODULES = ("text_decoder", "vision_tower", "audio_tower", "multi_modal_projector")
_ALIASES = {"vision_model": "vision_tower", "default": "text_decoder"}

_PREFIXES = {
    "vision_tower": "vision_tower",
    "vision_model": "vision_tower",
    "visual": "vision_tower",
    "vision_encoder": "vision_tower",
    "audio_tower": "audio_tower",
    "audio_model": "audio_tower",
    "audio_encoder": "audio_tower",
    "multi_modal_projector": "multi_modal_projector",
    "mm_projector": "multi_modal_projector",
}
_MERGERS = ("merger", "deepstack_merger_list")
_SUB_CONFIGS = {"vision_tower": "vision_config", "audio_tower": "audio_config"}
_COUNT_KEYS = ("num_hidden_layers", "depth", "num_layers", "n_layers", "encoder_layers")
# What a tower computes before its first block: patch, position and class embeddings,
# and the norm in front of the blocks.
_BEFORE_BLOCKS = re.compile(
    r"(?:^|\.)(?:\w*embed\w*|patch_conv|pre_layrnorm|ln_pre|layernorm_pre)(?:\.|$)"
)


def module_of(name: str) -> str:
    """The module a tensor belongs to."""
    parts = name.split(".")
    if parts[0] == "model" and len(parts) > 1:
        parts = parts[1:]
    module = _PREFIXES.get(parts[0], "text_decoder")
    if module == "vision_tower" and len(parts) > 1 and parts[1] in _MERGERS:
        return "multi_modal_projector"
    return module


def canonical_module(name: str) -> str | None:
    """The module a recipe's `modules:` key names, or None if it names none."""
    return name if name in MODULES else _ALIASES.get(name)


def unknown_module_message(name: str) -> str:
    aliases = ", ".join(f"{a} (= {m})" for a, m in _ALIASES.items())
    return f"unknown module {name!r}; modules are {', '.join(MODULES)}; aliases {aliases}"


def module_names(names: Iterable[str]) -> dict[str, list[str]]:
    """The names grouped by module (in the order of MODULES), each in the given order."""
    out: dict[str, list[str]] = {m: [] for m in MODULES}
    for n in names:
        out[module_of(n)].append(n)
    return {m: found for m, found in out.items() if found}


def before_blocks(name: str) -> bool:
    """A tensor outside the blocks that acts before the first one (when slices stack
    layers, these come from the first slice and the rest from the last, as in
    mergekit): token and position embeddings, and a tower's patch embedding and
    pre-norm."""
    r = describe(name)
    if r.layer is not None:
        return False
    if r.role in ("embed", "pos_embed"):
        return True
    return module_of(name) != "text_decoder" and bool(_BEFORE_BLOCKS.search(name))


def _sub_config(config: dict[str, Any], module: str) -> dict[str, Any] | None:
    if module == "text_decoder":
        return text_config(config)
    sub = config.get(_SUB_CONFIGS.get(module, ""))
    return sub if isinstance(sub, dict) else None


def _count_key(config: dict[str, Any], module: str) -> str | None:
    if module == "text_decoder":
        return layer_count_key(config)
    sub = _sub_config(config, module) or {}
    return next((k for k in _COUNT_KEYS if isinstance(sub.get(k), int)), None)


def module_depth(config: dict[str, Any], module: str, names: Iterable[str]) -> int:
    """The number of layers of a module, from the config or else from tensor names."""
    names = [n for n in names if module_of(n) == module]
    if module == "text_decoder":
        return num_layers(config, names)
    key = _count_key(config, module)
    if key is not None:
        return (_sub_config(config, module) or {})[key]
    layers = [r.layer for r in map(describe, names) if r.layer is not None]
    return max(layers) + 1 if layers else 0


def set_module_depth(config: dict[str, Any], module: str, depth: int) -> None:
    """Write a module's new layer count into `config` (after slicing), where it has one."""
    key = _count_key(config, module)
    sub = _sub_config(config, module)
    if key is not None and sub is not None:
        sub[key] = depth
