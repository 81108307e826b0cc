"""The one reader for every file weightops parses: bounded, typed, and exact about where.

Every JSON- or YAML-bearing input (safetensors headers, config.json, the shard index,
tokenizer side files, JSONL data, recipes) comes through here, so the same limits hold
everywhere: only regular files are opened (a FIFO or a device would block or never
end), the size is bounded before anything is read, text must be UTF-8 (a bad byte is
named with its offset), JSON is parsed strictly (no NaN, no duplicate keys, no lone
surrogates, integers of bounded size) and the nesting depth and node count of the
result are bounded, so a hostile file is one clear error, never a traceback, a hang
or a huge allocation.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weightops.errors import CheckpointError, WeightopsError

# Deeper than any config, header, recipe or data row in the wild (config.json is ~4).
MAX_DEPTH = 32
# Nodes in one parsed document (after YAML aliases are expanded, so an alias bomb is
# refused before it is walked in full).
MAX_NODES = 1_000_000
# Integers wider than this are corrupt everywhere weightops reads them; the bound
# also keeps Python's quadratic big-int parsing off the table.
MAX_INT_DIGITS = 64
MAX_CONFIG_BYTES = 64 * 2**20

ErrorFactory = Callable[..., WeightopsError]


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "named pipe (FIFO)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def open_regular(path: Path, what: str, error: ErrorFactory = CheckpointError) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file. The open
    does not block, so a FIFO in place of a file is an error, not a hang."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(
                f"{path}: {what} is a {_kind(mode)}, not a regular file",
                hint="point at the file itself",
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(
    path: Path, what: str, *, limit: int, error: ErrorFactory = CheckpointError
) -> bytes:
    """The whole content of a regular file of at most `limit` bytes."""
    fd = open_regular(path, what, error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(
                f"{path}: {what} is {size:,} bytes, more than the {limit:,} allowed",
                hint="this is not the file it should be",
            )
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if total > limit:
        raise error(f"{path}: {what} grew past {limit:,} bytes while it was read")
    return b"".join(chunks)


def decode_utf8(
    data: bytes, where: str, what: str, *, error: ErrorFactory = CheckpointError, base: int = 0
) -> str:
    """`data` as text; a byte that is not UTF-8 is named with its offset in the file
    (`base` is where `data` starts)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{where}: {what} is not UTF-8 text: byte {base + e.start} is 0x{data[e.start]:02x}",
            hint="save the file as UTF-8",
        ) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits is too large")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key[:80]!r} appears twice")
        out[key] = value
    return out


def _loads(text: str, where: str, what: str, error: ErrorFactory, base: int) -> Any:
    try:
        return json.loads(
            text,
            object_pairs_hook=_unique,
            parse_constant=_no_constant,
            parse_int=_int,
            parse_float=_float,
        )
    except json.JSONDecodeError as e:
        offset = base + len(text[: e.pos].encode("utf-8", "surrogatepass"))
        raise error(
            f"{where}: {what} is not valid JSON: {e.msg} at byte {offset}",
            hint="the file is corrupted or truncated",
        ) from None
    except RecursionError:
        raise error(f"{where}: {what} is nested too deeply", hint="the file is corrupted") from None
    except ValueError as e:
        raise error(f"{where}: {what} is not valid JSON: {e}") from None


def parse_json(
    text: str, where: str, what: str, *, error: ErrorFactory = CheckpointError, base: int = 0
) -> Any:
    """Strict JSON: duplicate keys, NaN/Infinity, huge integers, lone surrogates and
    nesting deeper than MAX_DEPTH are errors naming the byte offset where known."""
    # A tokenizer's hundred thousand new containers set off full collections, each of
    # which walks every object the process holds (torch and transformers loaded: about
    # 200,000): 0.6 s instead of 0.09 s for SmolLM2's 1.7 MB tokenizer.json. Parsing and
    # checking make no reference cycles, so there is nothing for the collector to find.
    paused = gc.isenabled()
    gc.disable()
    try:
        value = _loads(text, where, what, error, base)
        check_tree(value, where, what, error=error, text=_may_hold_surrogates(text))
    finally:
        if paused:
            gc.enable()
    return value


def check_tree(
    value: Any, where: str, what: str, *, error: ErrorFactory = CheckpointError, text: bool = True
) -> None:
    """Bound the depth and size of a parsed document and refuse strings that are not
    valid Unicode (lone surrogates from `\\ud800` escapes cannot be written as UTF-8);
    `text=False` skips the strings, for a document whose source holds no such escape.
    A value at depth d counts as a node at depth d, scalars included."""
    if isinstance(value, str) and text:
        _check_text(value, where, what, error)
    stack = [(value, 1)]
    nodes = 1
    # Only containers are walked: a tokenizer's vocabulary is mostly scalars, and
    # pushing each of them cost more than the parse.
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise error(f"{where}: {what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            items = node.values()
            if text:
                for k in node:
                    if isinstance(k, str):
                        _check_text(k, where, what, error)
        elif isinstance(node, (list, tuple)):
            items = node
        else:
            continue
        nodes += len(node)
        if nodes > MAX_NODES:
            raise error(f"{where}: {what} has more than {MAX_NODES:,} values")
        if node and depth + 1 > MAX_DEPTH:
            raise error(f"{where}: {what} is nested more than {MAX_DEPTH} levels deep")
        for v in items:
            if isinstance(v, (dict, list, tuple)):
                stack.append((v, depth + 1))
            elif text and isinstance(v, str):
                _check_text(v, where, what, error)


# A lone surrogate in parsed JSON comes from a \uD800–\uDFFF escape or from the text
# itself (never from text decoded as strict UTF-8).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _may_hold_surrogates(text: str) -> bool:
    if _SURROGATE_ESCAPE.search(text):
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_text(s: str, where: str, what: str, error: ErrorFactory) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise error(
            f"{where}: {what} holds the string {s[:40]!r} with a lone surrogate",
            hint="strings must be valid Unicode",
        ) from None


def load_json(
    path: Path,
    what: str,
    *,
    limit: int = MAX_CONFIG_BYTES,
    error: ErrorFactory = CheckpointError,
    kind: type = dict,
) -> Any:
    """A JSON file whose top level must be of type `kind` (an object by default)."""
    data = read_regular(path, what, limit=limit, error=error)
    value = parse_json(
        decode_utf8(data, str(path), what, error=error), str(path), what, error=error
    )
    if not isinstance(value, kind):
        raise error(
            f"{path}: {what} must be a JSON {'object' if kind is dict else kind.__name__}, "
            f"not {json_type(value)}",
            hint="the file is corrupted or not the file it should be",
        )
    return value


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


# A recipe is a page of YAML; even a large slices recipe is a few tens of kB.
MAX_RECIPE_BYTES = 1024 * 1024
# Models, slices, gradient points: a thousand is far past any real recipe.
MAX_RECIPE_LIST = 1000


def read_recipe_text(path: Path) -> str:
    """A recipe file as text, with the recipe's own error (one line per problem)."""
    from weightops.errors import RecipeError

    source = str(path)

    def error(message: str, *, hint: str | None = None) -> RecipeError:
        text = message.removeprefix(f"{source}: ")
        return RecipeError(source, [("", f"{text} ({hint})" if hint else text)])

    data = read_regular(path, "recipe", limit=MAX_RECIPE_BYTES, error=error)
    return decode_utf8(data, source, "the recipe", error=error)


def load_yaml(text: str, where: str, error: ErrorFactory, *, documents: bool = False) -> Any:
    """YAML text (safe subset), with the same depth, size and number bounds as JSON;
    `error(message)` makes the exception (messages do not repeat `where`). With
    `documents`, the list of every YAML document in the text (mergekit-multi)."""
    import yaml

    try:
        value = list(yaml.safe_load_all(text)) if documents else yaml.safe_load(text)
    except RecursionError:
        raise error("nested too deeply") from None
    except (ValueError, OverflowError, TypeError) as e:
        raise error(f"a value cannot be read: {str(e)[:200]}") from None

    def bare(message: str, *, hint: str | None = None) -> WeightopsError:
        return error(message.removeprefix(f"{where}: "), hint=hint)

    check_tree(value, where, "the recipe", error=bare)
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
            stack.extend(node.keys())
        elif isinstance(node, list):
            if len(node) > MAX_RECIPE_LIST:
                raise error(
                    f"a list has {len(node):,} entries, more than the {MAX_RECIPE_LIST:,} allowed"
                )
            stack.extend(node)
        elif isinstance(node, bool):
            continue
        elif isinstance(node, int) and abs(node) >= 2**63:
            raise error(f"the number {str(node)[:30]}… is too large")
        elif isinstance(node, float) and not math.isfinite(node):
            raise error(f"the number {node} is not finite")
    return value


def is_regular(path: Path) -> bool:
    """Whether `path` is a regular file (following links), without raising."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


Stamp = tuple[int, int, int, int]


def file_stamp(path: Path) -> Stamp | None:
    """(device, inode, size, mtime) of `path`: a file replaced, rewritten or resized
    changes it. None when the file is gone."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
