"""What a plan is made of: one `TensorTask` per output tensor, naming its inputs.

Tasks are independent and picklable; the executor (weightops.engine.run) reads each
task's inputs, merges them with the task's method and writes the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class InputRef:
    model: int  # index into Plan.models
    name: str  # stored tensor name (after following a tied lm_head)


@dataclass(frozen=True)
class TensorTask:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: tuple[InputRef, ...]
    base: InputRef | None
    params: tuple[tuple[str, Any], ...]
    method: str  # the merge method's name: modules may each have their own
    module: str = ""  # its `modules:` key; "" when the recipe has no modules
    copy: bool = False  # non-float tensors are copied from the first input, not merged
    seed: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.out_dtype).element_size()
