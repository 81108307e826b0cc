"""The few places where supported transformers versions differ in their API."""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def dtype_keyword() -> str:
    """transformers 4.56 renamed `torch_dtype=` to `dtype=` (the old name still works
    there, with a warning, and is gone from later releases' documentation)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def causal_lm(folder: Any, dtype: Any) -> Any:
    """AutoModelForCausalLM.from_pretrained(folder) in `dtype`, on any supported version."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, use_safetensors=True, **{dtype_keyword(): dtype}
    )


def causal_lm_from_config(config: Any, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, **{dtype_keyword(): dtype})
