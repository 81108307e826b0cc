"""Where steering reads and writes in a transformers model.

Layer i means the output of decoder block i (the convention of repeng and llama.cpp).
The blocks are found by rule: the ModuleList at a known path (`model.layers` for the
Llama family, `transformer.h` for GPT-2, `gpt_neox.layers` for GPT-NeoX), else the only
ModuleList as long as the config's layer count. `layers_path=` overrides the search.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from weightops.errors import WeightopsError

KNOWN_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")

# Per family: the module in a block whose output is added to the residual stream last
# (an addition there equals an addition to the block output), and every module that
# writes to the residual stream (for directional ablation).
_LAST_WRITER = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}
_WRITERS = {
    # Gemma 2/3 normalise each sublayer's output before adding it to the stream.
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
}
_LLAMA_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
# Families whose block outputs pass through a norm after the MLP: an addition to the
# MLP's bias would be normalised away, and the sublayer outputs are not what reaches
# the residual stream.
POST_NORM_FAMILIES = ("gemma2", "gemma3", "gemma3_text", "olmo2")


class SteeringError(WeightopsError):
    """A steering vector does not fit the model, or its inputs are unusable."""


@dataclass(frozen=True)
class Layout:
    path: str
    blocks: nn.ModuleList
    model_type: str
    hidden_size: int

    def writers(self, layer: int) -> list[nn.Module]:
        """The modules of block `layer` whose outputs are added to the residual stream."""
        names = _WRITERS.get(self.model_type, _LLAMA_WRITERS)
        return [self.blocks[layer].get_submodule(n) for n in names]


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_layers(model: nn.Module, layers_path: str | None = None) -> Layout:
    """The decoder blocks of a transformers causal LM."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = str(getattr(config, "model_type", "unknown"))
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    depth = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if layers_path is not None:
        blocks = _get(model, layers_path)
        if not isinstance(blocks, nn.ModuleList):
            raise SteeringError(
                f"layers_path {layers_path!r} is not a ModuleList in {type(model).__name__}"
            )
        return Layout(layers_path, blocks, model_type, int(hidden or 0))
    for path in KNOWN_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and (depth is None or len(blocks) == depth):
            return Layout(path, blocks, model_type, int(hidden or 0))
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == depth
    ]
    if len(candidates) == 1:
        return Layout(candidates[0][0], candidates[0][1], model_type, int(hidden or 0))
    raise SteeringError(
        f"cannot find the decoder blocks of {type(model).__name__}",
        hint="pass layers_path='…' naming the ModuleList of decoder blocks",
    )


def last_writer_name(model_type: str) -> str:
    return _LAST_WRITER.get(model_type, "mlp.down_proj")
