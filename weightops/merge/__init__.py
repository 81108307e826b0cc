"""Merge methods: one module each, registered by name with `@merge_method`.

Importing this package registers the built-in methods; `get_method(name)` finds one.
"""

from weightops.merge import (  # noqa: F401  (imported to register the methods)
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_averaging,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv,
)
from weightops.merge.registry import MethodSpec, all_methods, get_method, merge_method

__all__ = ["MethodSpec", "all_methods", "get_method", "merge_method"]
