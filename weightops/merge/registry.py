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
  reproducible and independent of the order tensors are processed in. A method that
  declares `draws=` gets a list instead, one generator per input (see `merge_method`).
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
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from weightops.errors import RecipeError
from weightops.merge.params import (
    PER_MODEL,
    Blocks,
    NonNegative,
    ParamSpec,
    PerModel,
    Range,
    Unit,
    param_spec,
)

__all__ = [
    "PER_MODEL",
    "Blocks",
    "MethodSpec",
    "NonNegative",
    "ParamSpec",
    "PerModel",
    "Range",
    "Unit",
    "all_methods",
    "get_method",
    "merge_method",
    "numerics_variant",
]


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
    ranks: Callable[[dict[str, Any], int], list[tuple[int | None, ...]] | None] | None = None
    draws: Callable[[dict[str, Any], tuple[int, ...]], list[bool] | None] | None = None
    observer: Callable[[], Observer] | None = None
    check: Callable[[dict[str, Any]], str | None] | None = None
    doc: str = field(default="", repr=False)

    @property
    def summary(self) -> str:
        return (self.doc.strip().splitlines() or [""])[0]

    def cut_positions(
        self, params: dict[str, Any], numel: int, numerics: str
    ) -> list[tuple[int | None, ...]] | None:
        """The ascending ranks of each input's |task vector| at which the method cuts
        (None: no cut there), when it can run on row blocks given them; else None."""
        if self.ranks is None or numerics != DEFAULT_NUMERICS:
            return None
        return self.ranks(params, numel)

    def drawing_inputs(
        self, params: dict[str, Any], shape: tuple[int, ...], numerics: str
    ) -> list[bool] | None:
        """Which inputs draw one random number per entry, when the method can run on row
        blocks given generators positioned at each input's draws; else None."""
        if self.draws is None or numerics != DEFAULT_NUMERICS:
            return None
        return self.draws(params, shape)

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
        rng: torch.Generator | list[torch.Generator | None] | None = None,
        stats: object = None,
        name: str = "",
        numerics: str = "default",
        cuts: object = None,
    ) -> torch.Tensor:
        fn = self.fn if numerics == DEFAULT_NUMERICS else _VARIANTS[(self.name, numerics)]
        kwargs = {self.params[k].py_name: v for k, v in params.items() if k in self.params}
        if self.wants_rng:
            if self.draws is not None and fn is self.fn and not isinstance(rng, list):
                # A whole tensor: every input draws from the one generator in turn.
                rng = [rng] * len(tensors)
            kwargs["rng"] = rng
        if self.wants_stats:
            kwargs["stats"] = stats
        if self.wants_name:
            kwargs["name"] = name
        if self.ranks is not None and numerics == DEFAULT_NUMERICS:
            kwargs["cuts"] = cuts
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
    ranks: Callable[[dict[str, Any], int], list[tuple[int | None, ...]] | None] | None = None,
    draws: Callable[[dict[str, Any], tuple[int, ...]], list[bool] | None] | None = None,
    check: Callable[[dict[str, Any]], str | None] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a merge method under `name`; duplicate names are an error.

    `elementwise=True` promises that each output entry depends only on the same entry
    of the inputs; the engine may then run the method on row blocks of large tensors.
    `ranks(params, n)` says at which ascending ranks of each input's |θᵢ − θ_base|
    (ties in index order) the method cuts its task vectors, or None where it needs the
    tensor whole; the engine then finds those cuts with an exact streaming selection
    and runs the method on row blocks, passing each block's `Cut`s (weightops.merge.cuts)
    as the keyword-only `cuts` argument, which is None for whole tensors.
    `draws(params, shape)` is for random methods whose output rows each depend only on
    the same rows of the inputs and on random numbers drawn for them: it says which
    inputs draw one number per entry, in row-major order, each input's after the
    previous one's from the same generator (or None where the tensor must be whole).
    The method's `rng` is then a list with one generator per input: for a whole tensor
    the same generator each time, and for a row block one positioned at that input's
    first draw for the block, so blocks draw exactly the numbers of the whole tensor.
    With `observer`, the engine first runs a statistics pass (see Observer) and passes
    its result to the method's keyword-only `stats` argument. `check` tests the resolved
    parameters of each output tensor together while planning (see the module docstring).
    """

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        if (ranks is None) != ("cuts" not in inspect.signature(fn).parameters):
            raise ValueError(f"merge method {name!r}: `ranks` and a `cuts` argument go together")
        if draws is not None and "rng" not in inspect.signature(fn).parameters:
            raise ValueError(f"merge method {name!r}: `draws` needs an `rng` argument")
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
            if p.name == "cuts":
                continue
            params[p.name.rstrip("_")] = param_spec(p, hints.get(p.name, Any))
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
            ranks=ranks,
            draws=draws,
            check=check,
            doc=inspect.getdoc(fn) or "",
        )
        return fn

    return register


def numerics_variants() -> dict[tuple[str, str], Callable[..., torch.Tensor]]:
    """Every registered variant, by (method, numerics)."""
    _load_builtin()
    return dict(_VARIANTS)


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
