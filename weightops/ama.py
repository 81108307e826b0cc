"""Adaptive Model Averaging (AMA): learn how much of the pre-RLHF model each part of
the network should keep (Lin et al., "Mitigating the Alignment Tax of RLHF").

Model averaging mixes the model before RLHF (θ_pre, the SFT model) and after it
(θ_post): θ = α·θ_pre + (1 − α)·θ_post. AMA gives every group of decoder layers its own
ratio and learns them, with the model weights frozen:

    αᵍ = budget · (σ(aᵍ) + ε) / meanₕ(σ(aʰ) + ε)

one logit aᵍ per group, so the mean ratio is always the budget and ε bounds how far the
ratios spread. The logits start at 0 (every ratio at the budget) and follow the
gradient of

    loss = objective(merged model) + reg · Σᵍ |αᵍ − budget|

where the objective is by default the causal-LM loss of the preference data's chosen
responses (prompt tokens masked): the alignment-reward proxy of the paper. At a fixed
mean ratio, the search moves θ_pre's share to the layers where it costs the least
reward.

Which tensors are blended follows the paper's reference code by default
(`others="pre"`): the weight matrices of the decoder blocks' linear projections take
their group's ratio, lm_head the budget, and everything else (embeddings, norms,
biases) comes from θ_pre. `others="alpha"` blends every tensor (in-block ones at their
group's ratio, the rest at the budget), `others="post"` takes the rest from θ_post. The
written recipe (`model_averaging` with `alpha: budget`, `blocks` and the same `others`)
reproduces exactly the model the search scored.

What is held in memory: θ_pre as a loaded transformers model (the only full model),
plus, for each blended tensor, Δ = θ_post − θ_pre in the model's dtype, read from
θ_post's files one tensor at a time. Tensors that take a fixed mix (lm_head,
embeddings, final norm) are mixed once into the loaded model and need no Δ, so a
second or third full model is never built. Linear projections are not blended by
materialising α·θ_pre + (1 − α)·θ_post: a forward hook adds (1 − αᵍ)·x·Δᵀ to the
projection's output, which is the same product (the projection is linear in its weight)
without a merged weight that autograd would keep for the backward pass — one more
model-sized copy. Other in-block tensors blended under `others="alpha"` (norm gains)
are small and go through a parametrization.

Ratios are clamped to at most 1 where a model is built (the search and the written
recipe alike); with the defaults this only binds for many narrow groups pushed to
extremes, and the result reports it.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
import yaml

from weightops.ama_data import Encoded, collate, encode, read_preferences, response_loss
from weightops.ama_model import OTHERS, AMAError, AveragedModel, layer_groups, ratios

__all__ = [
    "OTHERS",
    "AMAError",
    "AMAResult",
    "AveragedModel",
    "Encoded",
    "collate",
    "encode",
    "layer_groups",
    "ratios",
    "read_preferences",
    "response_loss",
    "search",
]


@dataclass
class Step:
    step: int
    loss: float
    objective: float
    ratios: list[float]


@dataclass
class AMAResult:
    """What `search` learned: one ratio (θ_pre's share) per layer group."""

    groups: list[tuple[int, int]]
    ratios: list[float]
    budget: float
    eps: float
    others: str
    history: list[Step] = field(default_factory=list)

    @property
    def clamped(self) -> bool:
        return any(r > 1.0 for r in self.ratios)

    def recipe(self, pre: str | Path, post: str | Path, command: str | None = None) -> str:
        """A `weightops merge` recipe (model_averaging) building the searched model."""
        data = {
            "merge_method": "model_averaging",
            "base_model": str(pre),
            "models": [{"model": str(post)}],
            "parameters": {
                "alpha": float(self.budget),
                "blocks": [
                    [a, b, float(min(r, 1.0))]
                    for (a, b), r in zip(self.groups, self.ratios, strict=True)
                ],
                "others": self.others,
            },
        }
        body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
        mean = sum(self.ratios) / len(self.ratios)
        head = [
            "# weightops merge THIS_FILE -o merged-ama",
            "# Ratios (θ_pre's share per block of layers) learned by Adaptive Model Averaging:",
            f"# budget {self.budget:g} (mean ratio {mean:.6g}), eps {self.eps:g}, "
            f"{len(self.groups)} groups, others: {self.others}.",
        ]
        if command:
            head.insert(1, f"# made by: {command}")
        if self.clamped:
            head.append("# Some learned ratios exceeded 1 and are written as 1.")
        return "\n".join(head) + "\n" + body

    def save_recipe(
        self, path: str | Path, pre: str | Path, post: str | Path, command: str | None = None
    ) -> Path:
        path = Path(path)
        text = self.recipe(pre, post, command).replace("THIS_FILE", str(path), 1)
        path.write_text(text)
        return path


class _Reporter:
    """steps, loss and ETA on one line of a terminal; silent when piped."""

    def __init__(self, total: int, enabled: bool | None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.start, self._last = total, time.perf_counter(), 0.0

    def update(self, step: int, loss: float, alpha: list[float]) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.2 and step < self.total):
            return
        self._last = now
        left = (now - self.start) / step * (self.total - step)
        spread = f"ratios {min(alpha):.3f}…{max(alpha):.3f}"
        self.stream.write(
            f"\rama-search {step}/{self.total} steps  loss {loss:.4f}  {spread}  "
            f"ETA {int(left) // 60}:{int(left) % 60:02d}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _check(name: str, value: float, ok: bool, what: str) -> None:
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise AMAError(f"{name} must be {what} (got {value!r})")


def search(
    pre: str | Path,
    post: str | Path,
    *,
    objective: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    data: str | Path | Sequence[tuple[str, str]] | None = None,
    groups: str | Sequence[tuple[int, int]] = "layer",
    budget: float = 0.2,
    eps: float = 0.2,
    reg: float = 1e-4,
    lr: float = 0.01,
    epochs: int = 1,
    steps: int | None = None,
    batch_size: int = 4,
    max_length: int = 512,
    seed: int = 0,
    others: str = "pre",
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> AMAResult:
    """Learn one ratio per layer group by gradient descent on the group logits.

    Give `data` (a JSONL path of {"prompt", "chosen"} lines, or (prompt, response)
    pairs) to minimise the chosen responses' LM loss, or `objective`, any
    differentiable callable `objective(model) -> scalar loss` on the averaged
    transformers model (your own reward or tax measure; it may call the model as often
    as it likes). With data the search runs `epochs` passes of `batch_size` examples;
    with an objective, `steps` steps (default 100).

    Adam on the logits with learning rate `lr`. The paper's script uses 2e-5 for one
    epoch of a large preference set; that barely moves the logits on small data, so
    the default here is 1e-2. Returns the ratios and the history of every step
    (ratios included), and never changes the models on disk.
    """
    _check("budget", budget, 0 < budget <= 1, "in (0, 1]")
    _check("eps", eps, eps > 0, "> 0")
    _check("reg", reg, reg >= 0, ">= 0")
    _check("lr", lr, lr > 0, "> 0")
    _check("epochs", epochs, epochs >= 1, "at least 1")
    _check("batch_size", batch_size, batch_size >= 1, "at least 1")
    _check("max_length", max_length, max_length >= 2, "at least 2")
    if (objective is None) == (data is None):
        raise AMAError("give exactly one of data= or objective=")
    if steps is not None:
        _check("steps", steps, steps >= 1, "at least 1")

    torch.manual_seed(seed)
    averaged = AveragedModel(
        pre, post, groups, budget=budget, others=others, device=device, dtype=dtype
    )
    model = averaged.model
    batches: list[list[Encoded]] = []
    if data is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(pre)
        rows = (
            read_preferences(data)
            if isinstance(data, (str, Path))
            else [(p, r, f"data[{i}]") for i, (p, r) in enumerate(data)]
        )
        if not rows:
            raise AMAError("data holds no examples")
        encoded = encode(tok, rows, max_length)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        order = random.Random(seed)
        for _ in range(epochs):
            idx = list(range(len(encoded)))
            order.shuffle(idx)
            batches += [
                [encoded[i] for i in idx[b : b + batch_size]]
                for b in range(0, len(idx), batch_size)
            ]
        if steps is not None:
            batches = [batches[i % len(batches)] for i in range(steps)]
        total = len(batches)
    else:
        total = steps or 100

    logits = torch.zeros(len(averaged.groups), requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    history: list[Step] = []
    reporter = _Reporter(total, progress)
    try:
        for step in range(1, total + 1):
            alpha = ratios(logits, budget, eps)
            averaged.set_ratios(alpha)
            if objective is not None:
                task = objective(model)
            else:
                task = response_loss(model, collate(batches[step - 1], pad))
            if not (isinstance(task, torch.Tensor) and task.dim() == 0):
                raise AMAError("the objective must return a scalar tensor")
            if not task.requires_grad:
                raise AMAError(
                    "the objective's loss does not depend on the ratios "
                    "(call the model it is given, with gradients enabled)"
                )
            loss = task.float() + reg * (alpha - budget).abs().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            record = Step(step, loss.item(), task.item(), alpha.detach().tolist())
            history.append(record)
            if on_step is not None:
                on_step(record)
            reporter.update(step, record.loss, record.ratios)
    finally:
        reporter.close()
        averaged.close()
    final = ratios(logits.detach(), budget, eps).tolist()
    return AMAResult(
        groups=[(int(a), int(b)) for a, b in averaged.groups],
        ratios=final,
        budget=budget,
        eps=eps,
        others=others,
        history=history,
    )
