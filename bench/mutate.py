"""Mutators for the fuzz campaign (bench/fuzz.py): corrupt safetensors files, JSON
side files, recipes and JSONL data, each case reproducible from (seed, index).

Mutations are of two kinds: blind byte edits (flip, insert, delete, truncate,
append, change the header length by a few bytes) and structural edits of the parsed
header or document that aim at the places a reader trusts (types of fields, huge
numbers, deep nesting, duplicate keys, overlapping or gapped offsets, names that are
not valid Unicode, empty headers).
"""

from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path

# Values that break type assumptions, for any field.
ODD_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**31,
    2**63,
    2**64,
    10**400,
    1.5,
    -0.0,
    "",
    "x" * 300,
    "\udc80",
    [],
    [[]],
    {},
    {"a": 1},
    [True],
    [2**63, 0],
    [-1],
    ["1"],
]


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _dumps(obj: object) -> bytes:
    # ensure_ascii keeps lone surrogates as \ud800 escapes, as a hostile writer would.
    return json.dumps(obj, separators=(",", ":")).encode()


def _file(header: bytes, data: bytes, hlen: int | None = None, pad: bool = True) -> bytes:
    if pad:
        header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header) if hlen is None else hlen) + header + data


def split(blob: bytes) -> tuple[dict, bytes, bytes]:
    (hlen,) = struct.unpack("<Q", blob[:8])
    raw = blob[8 : 8 + hlen]
    return json.loads(raw), raw, blob[8 + hlen :]


def mutate_safetensors(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One corrupted variant of a valid safetensors file and the name of the mutation."""
    header, raw, data = split(blob)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names) if names else "t"
    kind = rng.choice(
        [
            "flip",
            "flip",
            "insert",
            "delete",
            "truncate",
            "append",
            "hlen",
            "hlen",
            "field",
            "field",
            "field",
            "metadata",
            "duplicate",
            "overlap",
            "gap",
            "swap_offsets",
            "surrogate",
            "empty",
            "nesting",
            "toplevel",
            "no_padding",
            "trailing",
        ]
    )
    if kind == "flip":
        b = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(min(len(b), 8 + len(raw) + 8))
            b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "insert":
        i = rng.randrange(len(blob) + 1)
        return kind, blob[:i] + rng.randbytes(rng.randint(1, 8)) + blob[i:]
    if kind == "delete":
        i = rng.randrange(len(blob))
        return kind, blob[:i] + blob[i + rng.randint(1, 8) :]
    if kind == "truncate":
        return kind, blob[: rng.randrange(len(blob))]
    if kind == "append":
        return kind, blob + rng.randbytes(rng.randint(1, 16))
    if kind == "hlen":
        return kind, struct.pack("<Q", max(0, len(raw) + rng.randint(-7, 7))) + blob[8:]
    if kind == "no_padding":
        return kind, _file(raw.rstrip(b" "), data, pad=False)
    if kind == "trailing":
        return kind, _file(raw.rstrip(b" ") + rng.choice([b"\0", b"\t", b"x", b"}"]), data)
    if kind == "empty":
        return kind, _file(rng.choice([b"{}", b"", b"{ }"]), rng.choice([b"", data]))
    if kind == "nesting":
        return kind, _file(f'{{"{name}":{deep(rng.choice([40, 1000, 5000]))}}}'.encode(), data)
    if kind == "toplevel":
        return kind, _file(_dumps(rng.choice(ODD_VALUES)), data)
    if kind == "duplicate":
        entry = _dumps(header.get(name, {}))
        text = raw.rstrip(b" ")[:-1] + b',"' + name.encode() + b'":' + entry + b"}"
        return kind, _file(text, data)
    if kind == "surrogate":
        text = raw.replace(_dumps(name), rng.choice([b'"\\ud800"', b'"a\\udfff"', b'"\\u0000"']))
        return kind, _file(text, data)
    h = json.loads(raw)
    if kind == "metadata":
        h["__metadata__"] = rng.choice(ODD_VALUES)
    elif kind == "field" and name in h:
        field = rng.choice(["dtype", "shape", "data_offsets", "extra"])
        if rng.random() < 0.2:
            h[name].pop(field, None)
        else:
            h[name][field] = rng.choice([*ODD_VALUES, "F32", "U16", "F4", [1, 2], [0, 0, 0]])
    elif kind in ("overlap", "gap", "swap_offsets") and name in h:
        begin, end = h[name]["data_offsets"]
        shift = rng.randint(1, 8)
        if kind == "overlap":
            h[name]["data_offsets"] = [max(0, begin - shift), max(0, end - shift)]
        elif kind == "gap":
            h[name]["data_offsets"] = [begin + shift, end + shift]
        else:
            other = rng.choice(names)
            h[name]["data_offsets"], h[other]["data_offsets"] = (
                h[other]["data_offsets"],
                h[name]["data_offsets"],
            )
    return kind, _file(_dumps(h), data)


def mutate_json(text: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A corrupted config.json / index / tokenizer_config.json."""
    kind = rng.choice(["top", "value", "nonutf8", "deep", "truncate", "flip", "dupkey", "huge"])
    if kind == "top":
        return kind, _dumps(rng.choice(ODD_VALUES))
    if kind == "nonutf8":
        i = rng.randrange(len(text) + 1)
        return kind, text[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"]) + text[i:]
    if kind == "deep":
        return kind, b'{"a":' + deep(rng.choice([40, 1000, 100000])).encode() + b"}"
    if kind == "truncate":
        return kind, text[: rng.randrange(len(text) + 1)]
    if kind == "flip":
        b = bytearray(text)
        if b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "dupkey":
        return kind, text.rstrip()[:-1] + b',"a":1,"a":2}'
    if kind == "huge":
        return kind, b'{"n":' + b"9" * rng.choice([50, 5000]) + b"}"
    data = json.loads(text)
    if isinstance(data, dict) and data:
        key = rng.choice(list(data))
        data[key] = rng.choice(ODD_VALUES)
        if key == "weight_map" and rng.random() < 0.5:
            data[key] = rng.choice([{}, {"x": "../escape.safetensors"}, {"x": "/etc/passwd"}])
    return kind, _dumps(data)


def mutate_text(text: bytes, rng: random.Random, snippets: list[bytes]) -> tuple[str, bytes]:
    """A corrupted recipe or JSONL file: byte edits and inserted hostile snippets."""
    kind = rng.choice(
        ["flip", "insert", "delete", "snippet", "snippet", "snippet", "replace", "number", "number"]
    )
    numbers = list(re.finditer(rb"(?<![\w.])-?\d+(\.\d+)?(?![\w.])", text))
    if kind == "number" and numbers:
        # A plausible edit: another value, in or out of the parameter's range.
        m = rng.choice(numbers)
        value = rng.choice([b"0", b"1", b"-1", b"0.5", b"2", b"1e-9", b"100", b"0.0", b"3"])
        return kind, text[: m.start()] + value + text[m.end() :]
    if kind == "flip" and text:
        b = bytearray(text)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "delete" and text:
        i = rng.randrange(len(text))
        return kind, text[:i] + text[i + rng.randint(1, 12) :]
    if kind == "insert":
        i = rng.randrange(len(text) + 1)
        return kind, text[:i] + rng.choice([b"\xff", b"\x00", b"\xc3(", b"[", b"{", b":"]) + text[
            i:
        ]
    if kind == "replace":
        lines = text.split(b"\n")
        i = rng.randrange(len(lines))
        lines[i] = rng.choice(snippets)
        return kind, b"\n".join(lines)
    i = text.rfind(b"\n", 0, rng.randrange(len(text) + 1)) + 1
    return "snippet", text[:i] + rng.choice(snippets) + b"\n" + text[i:]


RECIPE_SNIPPETS = [
    b"slices: []",
    b"models: []",
    b"parameters: {lambda: []}",
    b"parameters: {density: []}",
    b"    parameters: {weight: [], density: []}",
    b"parameters: {weight: 1" + b"0" * 400 + b"}",
    b"parameters: {weight: 1e400}",
    b"parameters: {weight: .nan}",
    b"# a comment \xff\xfe",
    b"base_model: " + b"x" * 300,
    b"  - model: " + b"y" * 5000,
    b"  - model: /dev/null",
    b"tokenizer_source: /proc/self",
    b"x: " + deep(3000).encode(),
    b"parameters: {weight: " + deep(200).encode() + b"}",
    b"dtype: [1]",
    b"merge_method: [ties]",
    b"output: " + b"z" * 300,
    b"a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]",
    b"parameters: {weight: [" + b",".join([b"0.5"] * 5000) + b"]}",
    b"\t\x00",
    b"chat_template: !!python/object/apply:os.system ['true']",
]

JSONL_SNIPPETS = [
    b'{"positive": "' + b"word " * 200_000 + b'", "negative": "no"}',
    b'{"prompt": ' + deep(100_000).encode() + b"}",
    b'{"positive": "a\xff", "negative": "b"}',
    b'{"text": 1' + b"0" * 5000 + b"}",
    b"[1, 2]",
    b"null",
    b'{"prompt": "\\ud800"}',
    b'{"prompt": "a", "prompt": "b"}',
    b'{"positive": NaN, "negative": "x"}',
    b'{"text": {"a": [1, {"b": null}]}}',
    b"\xef\xbb\xbf{}",
]


def base_recipes(fam: Path) -> list[bytes]:
    m = {k: fam / k for k in ("base", "ft_a", "ft_b")}
    return [
        (
            f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n"
            f"  - model: {m['ft_a']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"  - model: {m['ft_b']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            "dtype: float32\n"
        ).encode(),
        (
            f"merge_method: task_arithmetic\nbase_model: {m['base']}\nmodels:\n"
            f"  - model: {m['ft_a']}\n    parameters: {{weight: 1.0}}\n"
            "parameters: {lambda: 0.8}\n"
        ).encode(),
        (
            f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {m['base']}\n"
            f"        layer_range: [0, 2]\n  - sources:\n      - model: {m['ft_a']}\n"
            "        layer_range: [2, 4]\n"
        ).encode(),
        (
            f"merge_method: linear\nmodels:\n  - model: {m['ft_a']}\n    parameters:\n"
            "      weight: [0.2, 0.8]\n"
            f"  - model: {m['ft_b']}\n    parameters:\n      weight:\n"
            "        - filter: mlp\n          value: 0.3\n        - value: 0.7\n"
        ).encode(),
    ]


# One valid file per reader: steering pairs, repair examples, calibration texts.
BASE_JSONL = [
    b'{"positive": "I love it", "negative": "I hate it"}\n{"positive": "yes", "negative": "no"}\n',
    b'{"prompt": "Hello", "response": "Hi"}\n{"prompt": "How?"}\n',
    b'{"text": "some text"}\n{"prompt": "other text"}\n',
]
