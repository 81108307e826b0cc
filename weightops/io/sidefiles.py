"""The files beside the weights: config, generation config, tokenizer, model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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


def write_config(folder: Path, config: dict[str, Any]) -> None:
    if config:
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_generation_config(source: Path, folder: Path) -> None:
    gen = source / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, folder / gen.name)


def copy_tokenizer(
    source: Path | None, folder: Path, chat_template: str | None = None
) -> list[str]:
    """Copy the tokenizer files that exist in `source`; return their names."""
    copied = []
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, folder / name)
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
