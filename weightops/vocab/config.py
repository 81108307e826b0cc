"""The recipe's tokenizer settings: `tokenizer_source:` and the `tokenizer:` block.

Same keys and meanings as mergekit:

    tokenizer_source: union | base | path/to/model
    tokenizer:
      source: union | base | path/to/model      # default union
      pad_to_multiple_of: 64                    # embedding rows rounded up to a multiple
      tokens:
        "<|im_start|>":
          source: path/to/model                 # that model's row for the same token
          force: true                           # even in models that have the token
        "<|im_end|>":
          source: {kind: model_token, model: path/to/model, token: "</s>"}  # or token_id
        "<pad>":
          source: {kind: zero}

Only one of the two keys may be given. Without either, the tokenizer files of the
base model (else the first model) are copied and the embeddings are merged row for
row as they are stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, model_validator

if TYPE_CHECKING:
    from weightops.recipe import Recipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenSource(_Strict):
    """A row by kind: `model_token` (one model's row for a token, by string or id) or
    `zero`."""

    kind: Literal["model_token", "zero"]
    model: str | None = None
    token_id: NonNegativeInt | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _fields_of_kind(self) -> TokenSource:
        if self.kind == "zero":
            if (self.model, self.token, self.token_id) != (None, None, None):
                raise ValueError("kind zero takes no model, token or token_id")
        elif self.model is None:
            raise ValueError("kind model_token needs a model")
        elif (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token or token_id")
        return self


class TokenSettings(_Strict):
    """Where one token's embedding comes from. A model path: that model's row for the
    same token. No source: the token is added to the vocabulary and gets the usual
    default (see weightops.vocab.rows)."""

    source: TokenSource | str | None = None
    force: bool = False


class TokenizerSettings(_Strict):
    source: str = "union"
    tokens: dict[str, TokenSettings] | None = None
    pad_to_multiple_of: PositiveInt | None = None


def effective(recipe: Recipe) -> TokenizerSettings | None:
    """The recipe's tokenizer settings as one block, or None when the tokenizer is
    only copied (neither key given)."""
    if recipe.tokenizer is not None:
        return recipe.tokenizer
    if recipe.tokenizer_source is not None:
        return TokenizerSettings(source=recipe.tokenizer_source)
    return None


def check_tokenizer(recipe: Recipe) -> list[tuple[str, str]]:
    """Problems of the tokenizer keys: both given, or a token sourced from a model
    that is not merged (its embedding rows would not be read)."""
    problems: list[tuple[str, str]] = []
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        problems.append(
            ("tokenizer_source", "give either tokenizer_source or a tokenizer: block, not both")
        )
    merged = set(recipe.model_paths())
    for token, cfg in ((recipe.tokenizer and recipe.tokenizer.tokens) or {}).items():
        where = f"tokenizer.tokens[{token!r}]"
        model = cfg.source.model if isinstance(cfg.source, TokenSource) else cfg.source
        if isinstance(model, str) and model not in merged:
            problems.append(
                (
                    f"{where}.source",
                    f"model {model!r} is not one of the merged models (use one listed "
                    "under models/slices/base_model, spelt the same)",
                )
            )
        if cfg.force and cfg.source is None:
            problems.append((f"{where}.force", "force needs a source for the token"))
    return problems
