"""The registry of merge methods.

A method is a pure tensor function registered with `@merge_method`. Its parameters are
read from its keyword-only signature:

    @merge_method("ties", base="required", reference="https://arxiv.org/abs/2306.01708")
    def ties(tensors, base, *, weight: PerModel[float], density: PerModel[Unit] = 1.0,
             lambda_: float = 1.0, normalize: bool = True) -> Tensor: ...

- `tensors` is the list of input tensors (compute dtype, same shape), `base` the base
  model's tensor or None. The result is one tensor of the same shape. The inputs are
  the method's own copies: it may overwrite them (and should, where that saves a
  model-sized temporary), so callers outside the engine pass clones they can lose.
- `PerModel[T]` parameters take one value per input model (from each model's
  `parameters`, falling back to the recipe's global `parameters`); the function gets a list.
- Other parameters are shared by all inputs of a tensor (global or slice `parameters`).
- A trailing underscore is dropped from the recipe name (`lambda_` is `lambda`).
- `Annotated[float, Range(gt=0, le=1)]` bounds a value; the recipe is checked against it.
- A parameter without a default is required.
- A parameter named `rng` is not a recipe parameter: the engine passes a torch.Generator
  seeded from the recipe's `seed` parameter and the tensor's name, so random methods are
  reproducible and independent of the order tensors are processed in.
- A parameter named `name` is not a recipe parameter either: the engine passes the
  output tensor's name, for methods whose work depends on where a tensor sits (per-layer
  settings from whole-model statistics, which axis a permutation acts on).
- `Literal["a", "b"]` is a string parameter that must be one of the listed choices.
- `check=fn` on `merge_method` tests a tensor's resolved parameters together (bounds
  that involve two parameters): `fn(params)` returns what is wrong, or None. The
  planner calls it for every output tensor, so a bad combination fails before any
  tensor is read.
- `Blocks` is a table of inclusive, non-overlapping decoder-layer ranges with a value
  each, written `[[first, last, value], …]` in a recipe; a `Range` bounds the values.
  The method gets a `Blocks` (or None) and finds a tensor's layer from its `name` with
  `weightops.arch.describe`.

Numerics. By default the engine computes in fp32 (fp64 for `dtype: float64`). A
method may also register variants of its arithmetic under another name with
`@numerics_variant(method, "mergekit")` in its own module: same signature, but the
inputs arrive in the recipe's `dtype` and the variant repeats mergekit's order of
operations and roundings, so that `weightops merge --numerics mergekit` writes
mergekit's tensors bit for bit. A method without the variant refuses that option.
A variant whose result is wider than its inputs in mergekit (a float32 mask) says so
with `widens_to=torch.float32`: without an `out_dtype` in the recipe, mergekit writes
that wider result as it is, and so does the engine.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, TypeVar

import torch

from weightops.errors import RecipeError

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


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    params: dict[str, ParamSpec]
    base: Literal["required", "optional", "unused"]
    min_models: int
    max_models: int | None
    reference: str
    wants_rng: bool = False
    wants_stats: bool = False
    wants_name: bool = False
    elementwise: bool = False
    observer: Callable[[], Observer] | None = None
    check: Callable[[dict[str, Any]], str | None] | None = None
    doc: str = field(default="", repr=False)

    @property
    def summary(self) -> str:
        return (self.doc.strip().splitlines() or [""])[0]

    def supports(self, numerics: str) -> bool:
        return numerics == DEFAULT_NUMERICS or (self.name, numerics) in _VARIANTS

    def result_dtype(self, numerics: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the method's result from inputs in `dtype` under `numerics`."""
        wider = _WIDENS.get((self.name, numerics))
        return dtype if wider is None else torch.promote_types(dtype, wider)

    def __call__(
        self,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        params: dict[str, Any],
        rng: torch.Generator | None = None,
        stats: object = None,
        name: str = "",
        numerics: str = "default",
    ) -> torch.Tensor:
        fn = self.fn if numerics == DEFAULT_NUMERICS else _VARIANTS[(self.name, numerics)]
        kwargs = {self.params[k].py_name: v for k, v in params.items() if k in self.params}
        if self.wants_rng:
            kwargs["rng"] = rng
        if self.wants_stats:
            kwargs["stats"] = stats
        if self.wants_name:
            kwargs["name"] = name
        return fn(tensors, base, **kwargs)


class Observer(Protocol):
    """Gathers whole-model statistics in a first streaming pass over every tensor.

    `observe` sees each floating-point output tensor's inputs (compute dtype, on the
    device) and resolved parameters; `result()` is passed to the method as `stats`.
    Keep what it gathers small (per-tensor scalars, per-layer vectors): it is held in
    memory for the whole run and must be picklable.
    """

    def observe(
        self,
        name: str,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        params: dict[str, Any],
    ) -> None: ...

    def result(self) -> object: ...


_REGISTRY: dict[str, MethodSpec] = {}
DEFAULT_NUMERICS = "default"
NUMERICS = (DEFAULT_NUMERICS, "mergekit")
_VARIANTS: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}
_WIDENS: dict[tuple[str, str], torch.dtype] = {}


def numerics_variant(
    method: str, numerics: str, *, widens_to: torch.dtype | None = None
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register `fn` as `method`'s arithmetic under `numerics` (see the module doc). Its
    keyword-only parameters must be the method's own; `widens_to` is the dtype its
    result is promoted with."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if numerics not in NUMERICS or numerics == DEFAULT_NUMERICS:
            raise ValueError(f"unknown numerics {numerics!r} for {method!r}")
        if (method, numerics) in _VARIANTS:
            raise ValueError(f"{method!r} already has {numerics} numerics")
        _VARIANTS[(method, numerics)] = fn
        if widens_to is not None:
            _WIDENS[(method, numerics)] = widens_to
        return fn

    return register


def merge_method(
    name: str,
    *,
    base: Literal["required", "optional", "unused"] = "unused",
    min_models: int = 1,
    max_models: int | None = None,
    reference: str = "",
    observer: Callable[[], Observer] | None = None,
    elementwise: bool = False,
    check: Callable[[dict[str, Any]], str | None] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a merge method under `name`; duplicate names are an error.

    `elementwise=True` promises that each output entry depends only on the same entry
    of the inputs; the engine may then run the method on row blocks of large tensors.
    With `observer`, the engine first runs a statistics pass (see Observer) and passes
    its result to the method's keyword-only `stats` argument. `check` tests the resolved
    parameters of each output tensor together while planning (see the module docstring).
    """

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        if (observer is None) != ("stats" not in inspect.signature(fn).parameters):
            raise ValueError(
                f"merge method {name!r}: an observer and a `stats` argument go together"
            )
        if not fn.__doc__:
            raise ValueError(
                f"merge method {name!r} needs a docstring (paper, formula, parameters)"
            )
        hints = typing.get_type_hints(fn, include_extras=True)
        params: dict[str, ParamSpec] = {}
        wants_rng = wants_stats = wants_name = False
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.name == "rng":
                wants_rng = True
                continue
            if p.name == "stats":
                wants_stats = True
                continue
            if p.name == "name":
                wants_name = True
                continue
            params[p.name.rstrip("_")] = _param_spec(p, hints.get(p.name, Any))
        _REGISTRY[name] = MethodSpec(
            name=name,
            fn=fn,
            params=params,
            base=base,
            min_models=min_models,
            max_models=max_models,
            reference=reference,
            wants_rng=wants_rng,
            wants_stats=wants_stats,
            wants_name=wants_name,
            observer=observer,
            elementwise=elementwise,
            check=check,
            doc=inspect.getdoc(fn) or "",
        )
        return fn

    return register


def numerics_variants() -> dict[tuple[str, str], Callable[..., torch.Tensor]]:
    """Every registered variant, by (method, numerics)."""
    _load_builtin()
    return dict(_VARIANTS)


def _param_spec(p: inspect.Parameter, hint: Any) -> ParamSpec:
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


def get_method(name: str) -> MethodSpec:
    """The method registered as `name`; an unknown name lists the valid ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise RecipeError("merge_method", [("merge_method", unknown_method_message(name))])
    return _REGISTRY[name]


def unknown_method_message(name: str) -> str:
    _load_builtin()
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown merge method {name!r}{hint} Valid methods: {', '.join(sorted(_REGISTRY))}"


def all_methods() -> dict[str, MethodSpec]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def _load_builtin() -> None:
    # Importing the package registers every built-in method module.
    import weightops.merge  # noqa: F401
