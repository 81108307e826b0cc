"""The files beside the weights: config, generation config, tokenizer, model card.

Side files are read through the strict reader (regular files only, bounded, JSON ones
parsed and checked) and their bytes written fresh into the output: a link is never
copied as a link. A side file that is a symbolic link leading out of the model folder
is refused, so a crafted folder cannot make a merge copy some other file of the
machine into its output; the one exception is the Hugging Face cache layout, whose
snapshot folders link into the repository's own `blobs/` folder. `auto_map` (code
that transformers would download and run with trust_remote_code) is dropped from the
configs written: that code is never copied, so the entries would point at nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from weightops.errors import CheckpointError
from weightops.io.safe_read import decode_utf8, parse_json, read_regular

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


# tokenizer.json of a 256k vocabulary is ~35 MB; nothing legitimate comes near this.
_MAX_SIDE_FILE = 512 * 2**20
REMOTE_CODE_KEYS = ("auto_map",)


def write_config(folder: Path, config: dict[str, Any]) -> None:
    if config:
        config = without_remote_code(config)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def without_remote_code(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in REMOTE_CODE_KEYS}


def read_side_file(source: Path, name: str) -> bytes | None:
    """The bytes of side file `name` in model folder `source` (None if absent), after
    checking where it leads and, for JSON files, that it parses."""
    path = source / name
    if not os.path.lexists(path):
        return None
    _refuse_escaping_link(source, path)
    data = read_regular(path, name, limit=_MAX_SIDE_FILE)
    if name.endswith(".json"):
        value = parse_json(decode_utf8(data, str(path), name), str(path), name)
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: {name} must be a JSON object", hint="fix or remove it")
        if any(k in value for k in REMOTE_CODE_KEYS):
            value = without_remote_code(value)
            data = (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()
    return data


def _refuse_escaping_link(source: Path, path: Path) -> None:
    real = path.resolve()
    home = source.resolve()
    allowed = [home]
    if home.parent.name == "snapshots":  # Hugging Face cache: snapshots/<rev>/ -> blobs/
        allowed.append(home.parent.parent / "blobs")
    if not any(real == a or a in real.parents for a in allowed):
        raise CheckpointError(
            f"{path}: is a link to {real}, outside the model folder",
            hint="copy the file itself into the model folder if it belongs there",
        )


def copy_generation_config(source: Path, folder: Path) -> None:
    data = read_side_file(source, "generation_config.json")
    if data is not None:
        (folder / "generation_config.json").write_bytes(data)


def copy_tokenizer(
    source: Path | None, folder: Path, chat_template: str | None = None
) -> list[str]:
    """Copy the tokenizer files that exist in `source`; return their names."""
    copied = []
    if source is not None:
        for name in TOKENIZER_FILES:
            data = read_side_file(source, name)
            if data is not None:
                (folder / name).write_bytes(data)
                copied.append(name)
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template)
        copied.append("chat_template.jinja")
    return copied


def save_tokenizer(tokenizer: Any, folder: Path, chat_template: str | None = None) -> list[str]:
    """Write a transformers tokenizer (a merged vocabulary) with save_pretrained; return
    the names of the files written."""
    before = set(folder.iterdir())
    tokenizer.save_pretrained(str(folder))
    written = sorted(p.name for p in set(folder.iterdir()) - before)
    return written + copy_tokenizer(None, folder, chat_template)


def write_card(
    folder: Path,
    *,
    title: str,
    summary: list[str],
    recipe_yaml: str,
    version: str,
    heading: str = "Recipe",
    tag: str = "merge",
) -> None:
    """README.md with a model card header; `tag` says which job made the model."""
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- weightops",
        f"- {tag}",
        "---",
        "",
        f"# {title}",
        "",
        f"Made with weightops {version}.",
        "",
        *summary,
        "",
        f"## {heading}",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
