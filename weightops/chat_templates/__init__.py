"""Chat templates a recipe's `chat_template:` may name, as in mergekit.

`chat_template: chatml` (or alpaca, exaone, llama3, mistral) writes that format's
template beside the merged tokenizer; `auto` picks the template that most of the input
models carry (none if none has one; on a tie, the first in recipe order, base first).
Any other value is the Jinja template itself, and, as in mergekit, must look like one
(at least 20 characters and a `{`), so that a misspelt name is not written out as a
template.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def check_chat_template(value: str | None) -> list[tuple[str, str]]:
    """A problem when `value` is neither a known name, `auto`, nor a template."""
    from weightops.recipe_checks import closest

    if value is None or value == "auto" or value in NAMES or _looks_like_template(value):
        return []
    return [
        (
            "chat_template",
            f"{value!r} is neither a template name nor a Jinja template"
            + closest(value, (*NAMES, "auto")),
        )
    ]


def _looks_like_template(value: str) -> bool:
    return len(value) >= 20 and "{" in value


def template_text(name: str) -> str:
    """The template of one of the NAMES."""
    return resources.files(__name__).joinpath(f"{name}.jinja").read_text()


def resolve_chat_template(value: str | None, models: list[Path]) -> str | None:
    """The template text a recipe's `chat_template` stands for (see the module)."""
    if value is None:
        return None
    if value == "auto":
        found = [t for t in (model_chat_template(m) for m in models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMES:
        return template_text(value)
    return value


def model_chat_template(folder: Path) -> str | None:
    """A checkpoint's own chat template (chat_template.jinja, else the one in
    tokenizer_config.json, whose list form names a `default`), stripped; or None."""
    folder = folder if folder.is_dir() else folder.parent
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text().strip() or None
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template.strip() or None if isinstance(template, str) else None
