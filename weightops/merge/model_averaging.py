"""Model averaging between the models before and after RLHF (Lin et al.)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from weightops.arch import describe, is_block_linear
from weightops.merge.registry import Blocks, Range, merge_method

Ratio = Annotated[float, Range(ge=0, le=1)]


def is_averaged_linear(name: str, shape: tuple[int, ...]) -> bool:
    """The tensors that `others: pre|post` still averages: the weight matrices of the
    decoder blocks' linear projections, and lm_head."""
    return is_block_linear(name, shape) or (
        describe(name).role == "lm_head" and name.endswith(".weight") and len(shape) == 2
    )


def ratio_for(
    name: str, shape: tuple[int, ...], alpha: float, blocks: Blocks | None, others: str
) -> float:
    """The share of θ_pre in tensor `name`: 1 and 0 stand for "copy θ_pre / θ_post"."""
    if others != "alpha" and not is_averaged_linear(name, shape):
        return 1.0 if others == "pre" else 0.0
    if blocks is not None:
        layer_alpha = blocks.at(describe(name).layer)
        if layer_alpha is not None:
            return layer_alpha
    return alpha


@merge_method(
    "model_averaging",
    base="required",
    min_models=1,
    max_models=1,
    elementwise=True,
    reference="https://arxiv.org/abs/2309.06256",
)
def model_averaging(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    alpha: Ratio,
    blocks: Annotated[Blocks, Range(ge=0, le=1)] | None = None,
    others: Literal["alpha", "pre", "post"] = "alpha",
    name: str,
) -> torch.Tensor:
    """Model averaging of the models before and after RLHF (Lin et al., "Mitigating the
    Alignment Tax of RLHF", EMNLP 2024).

    θ = α·θ_pre + (1 − α)·θ_post

    θ_pre (the SFT model, before RLHF) goes in the recipe's `base_model`; θ_post (after
    RLHF) is the one model under `models` (listing the base there too is fine). α is
    the share of θ_pre: α = 0 gives θ_post, α = 1 gives θ_pre, both exactly.

    Parameters:
      alpha (required, 0 … 1): the ratio everywhere `blocks` does not set one. A list
        of numbers is a gradient over the decoder layers, and `{filter, value}`
        conditions pick per tensor, as for any parameter. Tensors outside the decoder
        blocks (embeddings, final norm, lm_head) sit at depth 0 of a gradient.
      blocks (optional): partwise averaging, a table of inclusive decoder-layer ranges
        `[[0, 10, 0.4], [11, 20, 0.3]]`; every tensor of a listed layer takes that
        row's α. Ranges may not overlap; layers not listed, and tensors outside the
        decoder blocks, take `alpha`. `weightops ama-search` writes its learned ratios
        this way.
      others (default "alpha"): what tensors other than linear-projection weight
        matrices get — embeddings, every norm (inside the blocks and the final one),
        biases. "alpha": their α like everything else (plain averaging, the paper's
        formula). "pre": θ_pre, as in the paper's AMA reference code, which blends only
        linear layers; lm_head (a linear layer) still takes `alpha`, the reference's
        "lm_head at the budget ratio". "post": θ_post. A tied lm_head is the embedding
        matrix and follows the embeddings.
    """
    alpha = ratio_for(name, tuple(tensors[0].shape), alpha, blocks, others)
    post = tensors[0]
    if alpha == 0.0:
        return post
    assert base is not None, "model_averaging needs base_model (θ_pre)"
    if alpha == 1.0:
        return base
    # lerp's two-sided formula keeps the result within the inputs' range.
    return post.lerp_(base, alpha)
