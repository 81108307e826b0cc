"""The parameters of merge methods: how a method's signature declares them, and how a
recipe value is checked against that declaration.

`PerModel[T]` marks a per-model parameter, `Annotated[float, Range(...)]` bounds one,
`Literal[...]` lists a string's choices, and `Blocks` is a table of decoder-layer
ranges; `param_spec` reads one keyword-only parameter into a `ParamSpec` (see
weightops.merge.registry for the whole convention)."""

from __future__ import annotations

import inspect
import itertools
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

T = TypeVar("T")


class _PerModelMarker:
    pass


PER_MODEL = _PerModelMarker()
PerModel = Annotated[list[T], PER_MODEL]


@dataclass(frozen=True)
class Range:
    """Closed/open bounds for a numeric parameter."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def check(self, value: float) -> str | None:
        if self.gt is not None and not value > self.gt:
            return f"must be > {self.gt}"
        if self.ge is not None and not value >= self.ge:
            return f"must be >= {self.ge}"
        if self.lt is not None and not value < self.lt:
            return f"must be < {self.lt}"
        if self.le is not None and not value <= self.le:
            return f"must be <= {self.le}"
        return None


Unit = Annotated[float, Range(gt=0, le=1)]
NonNegative = Annotated[float, Range(ge=0)]


class Blocks(tuple):
    """A validated table of decoder-layer ranges: ((first, last, value), …), inclusive,
    sorted and non-overlapping. `at(layer)` is the value covering a layer, or None."""

    def at(self, layer: int | None) -> float | None:
        if layer is None:
            return None
        for first, last, value in self:
            if first <= layer <= last:
                return value
        return None

    @classmethod
    def parse(cls, value: Any, rng: Range | None = None) -> tuple[Blocks | None, str | None]:
        """The table from a recipe value, or (None, why it is not valid)."""
        shape = "must be a list of [first_layer, last_layer, value] entries"
        if not isinstance(value, (list, tuple)) or not value:
            return None, shape
        rows: list[tuple[int, int, float]] = []
        for i, entry in enumerate(value):
            where = f"entry {i} ({list(entry) if isinstance(entry, (list, tuple)) else entry!r})"
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                return None, f"{shape}; {where} is not"
            first, last, v = entry
            if not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in (first, last, v)
            ):
                return None, f"{shape}; {where} holds something other than numbers"
            if first != int(first) or last != int(last) or first < 0:
                return None, f"{where}: layers are whole numbers from 0"
            if last < first:
                return None, f"{where}: the last layer comes before the first"
            if v != v or v in (float("inf"), float("-inf")):
                return None, f"{where}: the value must be a finite number"
            if rng is not None and (msg := rng.check(float(v))):
                return None, f"{where}: the value {msg}"
            rows.append((int(first), int(last), float(v)))
        rows.sort()
        for (f0, l0, _), (f1, l1, _) in itertools.pairwise(rows):
            if f1 <= l0:
                return None, f"layers {f0}-{l0} and {f1}-{l1} overlap"
        return cls(rows), None

    @property
    def last_layer(self) -> int:
        return max(last for _, last, _ in self)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: type
    per_model: bool
    default: Any
    required: bool
    range: Range | None = None
    py_name: str = ""  # the name in the function's signature (`lambda_` for `lambda`)
    choices: tuple[str, ...] | None = None  # the allowed values of a Literal parameter

    def validate(self, value: Any) -> tuple[Any, str | None]:
        """Coerce one value (a scalar, or a whole table for `Blocks`); return (value,
        error message or None)."""
        if self.kind is Blocks:
            if isinstance(value, Blocks):
                return value, None
            table, msg = Blocks.parse(value, self.range)
            return (value, msg) if msg else (table, None)
        if self.kind is str:
            if not isinstance(value, str):
                return value, "must be a string"
            if self.choices is not None and value not in self.choices:
                return value, f"must be one of {', '.join(self.choices)}"
            return value, None
        if self.kind is bool:
            if isinstance(value, bool):
                return value, None
            return value, "must be true or false"
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                try:
                    value = float(value) if isinstance(value, str) else None
                except ValueError:
                    value = None
                if value is None:
                    return value, "must be a number"
            if value != value or value in (float("inf"), float("-inf")):
                return value, "must be a finite number"
            if self.kind is int:
                if float(value) != int(value):
                    return value, "must be a whole number"
                value = int(value)
            else:
                value = float(value)
            if self.range is not None and (msg := self.range.check(value)):
                return value, msg
            return value, None
        return value, None


def param_spec(p: inspect.Parameter, hint: Any) -> ParamSpec:
    per_model = False
    rng: Range | None = None
    # Unwrap Annotated and Optional layers: PerModel[Unit] is
    # Annotated[list[Annotated[float, Range]], PER_MODEL]; `Annotated[Blocks, …] | None`
    # puts the Optional outside.
    while True:
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        elif typing.get_origin(hint) is Annotated:
            for meta in hint.__metadata__:
                if meta is PER_MODEL:
                    per_model = True
                elif isinstance(meta, Range):
                    rng = meta
            hint = hint.__origin__
            if typing.get_origin(hint) is list:
                hint = typing.get_args(hint)[0]
        else:
            break
    choices = None
    if typing.get_origin(hint) is Literal:
        choices = tuple(str(a) for a in typing.get_args(hint))
        hint = str
    kind = hint if hint in (bool, int, float, str, Blocks) else float
    required = p.default is inspect.Parameter.empty
    return ParamSpec(
        name=p.name.rstrip("_"),
        py_name=p.name,
        kind=kind,
        per_model=per_model,
        default=None if required else p.default,
        required=required,
        range=rng,
        choices=choices,
    )
