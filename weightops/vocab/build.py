"""The merged tokenizer, built as mergekit builds it.

A model's vocabulary is its tokenizer's tokens whose id is below the row count of its
embedding matrix: ids at or above it have no row (tokenizers often list more tokens
than a padded or trimmed embedding has). The reference tokenizer is the base model's
(else the first model's), with the tokens it has no row for removed.

- `base`: the reference tokenizer.
- a model path: that model's tokenizer, as saved.
- `union`: the reference tokenizer, keeping every id, then each token of any model
  (models in recipe order, each model's tokens in id order) that is not yet in it,
  appended as a new added token; then the models' added tokens (special or not, with
  the settings of their first appearance) that are still missing.

Tokens named under `tokenizer.tokens` are then added as added tokens, as mergekit does:
one the result lacks is appended, one it has keeps its id. A model
whose tokenizer cannot be loaded is taken to share the reference's vocabulary.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightops.errors import MergeError


@dataclass
class Vocabulary:
    tokenizer: Any  # a transformers tokenizer: what the output folder gets
    tokens: list[str]  # the output's tokens by id
    source: str  # union, base or the tokenizer's model path
    model_vocabs: list[dict[str, int]]  # per input model: token -> its row
    borrowed: list[int]  # models without a tokenizer, given the reference's vocabulary


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    from weightops.demo import quiet_transformers

    quiet_transformers()
    return AutoTokenizer.from_pretrained(str(folder))


def _reload(tokenizer: Any, edit: Any = None) -> Any:
    """A fresh copy of `tokenizer` through its saved files, optionally edited on disk
    (the in-memory object is never changed)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if edit is not None:
            edit(Path(tmp))
        return load_tokenizer(Path(tmp))


def _drop_ids(model: dict[str, Any], rows: int, where: Path) -> set[str]:
    """Remove ids >= rows from a tokenizer.json model; return the removed tokens."""
    kind = model.get("type")
    vocab = model.get("vocab")
    if kind == "Unigram" and isinstance(vocab, list):
        removed = {entry[0] for entry in vocab[rows:]}
        model["vocab"] = vocab[:rows]
        return removed
    if kind in ("BPE", "WordLevel", "WordPiece") and isinstance(vocab, dict):
        removed = {tok for tok, i in vocab.items() if i >= rows}
        model["vocab"] = {tok: i for tok, i in vocab.items() if i < rows}
        if kind == "BPE":

            def keep(merge: Any) -> bool:
                parts = merge.split(" ") if isinstance(merge, str) else list(merge)
                return not ({*parts, "".join(parts)} & removed)

            model["merges"] = [m for m in model.get("merges", []) if keep(m)]
        return removed
    raise MergeError(
        f"{where}: the tokenizer has tokens without an embedding row, and its model type "
        f"{kind!r} cannot be trimmed",
        hint="trim the tokenizer to the embedding's rows, or use tokenizer_source: union "
        "with another model as base",
    )


def strip_tokenizer(tokenizer: Any, rows: int, where: Path) -> Any:
    """`tokenizer` without the tokens whose id has no embedding row."""
    if all(i < rows for i in tokenizer.get_vocab().values()):
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise MergeError(
            f"{where}: the tokenizer has tokens without an embedding row and no tokenizer.json",
            hint="save the tokenizer with a fast (tokenizers) backend",
        )

    def edit(folder: Path) -> None:
        data = json.loads((folder / "tokenizer.json").read_text())
        _drop_ids(data["model"], rows, where)
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < rows]
        (folder / "tokenizer.json").write_text(json.dumps(data))
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            decoder = config.get("added_tokens_decoder") or {}
            config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < rows}
            config_file.write_text(json.dumps(config))

    return _reload(tokenizer, edit)


def union_tokenizer(reference: Any, tokenizers: list[tuple[Any, int]]) -> Any:
    """The union of `tokenizers` ((tokenizer, rows) in order, the reference first)."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, rows in tokenizers:
        for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if i < rows:
                plain.setdefault(token)
        for i, info in sorted(tokenizer.added_tokens_decoder.items()):
            if i < rows:
                added.setdefault(info.content, info)
    out = _reload(reference)
    known = reference.get_vocab()
    new = [t for t in plain if t not in added and t not in known]
    if new:
        out.add_tokens(new)
    if added:
        out.add_tokens(list(added.values()))
    return out


def vocabulary_ids(tokenizer: Any, where: str) -> list[str]:
    """The tokenizer's tokens by id (ids must run 0 … n-1 without gaps)."""
    vocab = tokenizer.get_vocab()
    tokens: list[str | None] = [None] * len(vocab)
    for token, i in vocab.items():
        if i >= len(vocab):
            raise MergeError(
                f"{where}: token ids have gaps ({token!r} has id {i} in a vocabulary of "
                f"{len(vocab)})",
                hint="use a tokenizer whose ids are 0 … n-1",
            )
        tokens[i] = token
    return tokens  # type: ignore[return-value]


def build_vocabulary(
    source: str,
    extra_tokens: list[str],
    paths: list[Path],
    rows: list[int],
    reference: int,
    source_path: Path | None,
) -> Vocabulary:
    """The merged tokenizer of the models at `paths` (with `rows` embedding rows each),
    `reference` being the index of the base (or first) model."""
    try:
        base = load_tokenizer(paths[reference])
    except Exception as e:  # transformers raises many kinds for a missing/broken tokenizer
        raise MergeError(
            f"{paths[reference]}: cannot load its tokenizer ({e})",
            hint="vocabulary merging needs the reference model's tokenizer files",
        ) from e
    base = strip_tokenizer(base, rows[reference], paths[reference])
    loaded: list[Any] = []
    borrowed = []
    for i, path in enumerate(paths):
        if i == reference:
            loaded.append(base)
            continue
        try:
            loaded.append(load_tokenizer(path))
        except Exception:  # as mergekit: a model without a tokenizer shares the reference's
            loaded.append(None)
            borrowed.append(i)
    if source == "union":
        order = [reference, *(i for i in range(len(paths)) if i != reference)]
        out = union_tokenizer(base, [(loaded[i], rows[i]) for i in order if loaded[i] is not None])
    elif source == "base":
        out = _reload(base)
    else:
        assert source_path is not None
        try:
            out = load_tokenizer(source_path)
        except Exception as e:
            raise MergeError(
                f"tokenizer source {source_path}: cannot load its tokenizer ({e})"
            ) from e
    # As mergekit does: every token named under `tokenizer.tokens` is added, so one the
    # vocabulary already has becomes an added token with its id (matched whole in text).
    for token in dict.fromkeys(extra_tokens):
        out.add_tokens(token)
    vocabs = []
    for i, tokenizer in enumerate(loaded):
        vocab = (tokenizer or base).get_vocab()
        vocabs.append({t: j for t, j in vocab.items() if j < rows[i]})
    return Vocabulary(
        tokenizer=out,
        tokens=vocabulary_ids(out, source),
        source=source,
        model_vocabs=vocabs,
        borrowed=borrowed,
    )
