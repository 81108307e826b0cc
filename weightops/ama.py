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
from typing import Any, TextIO

import torch
import yaml

from weightops.arch import describe, is_block_linear, num_layers
from weightops.errors import WeightopsError
from weightops.merge.model_averaging import is_averaged_linear
from weightops.prompting import PromptError, encode_prompt, has_chat_template

OTHERS = ("pre", "alpha", "post")


class AMAError(WeightopsError):
    """The ratio search cannot run: bad settings, data or models."""


# ------------------------------------------------------------------------- groups


def layer_groups(n_layers: int, groups: str) -> list[tuple[int, int]]:
    """Inclusive layer ranges, one per group, covering layers 0 … n_layers − 1.

    - "layer": one group per decoder layer (the paper's shipped script).
    - "block3": the paper's three blocks, split at layers 8 and 16, or 11 and 21 for
      models over 30 layers; models of 16 layers or fewer get three near-equal blocks.
    - "blockN" (N ≥ 1, e.g. "block4"): N contiguous blocks of near-equal size, the
      larger ones first.
    """
    if n_layers < 1:
        raise AMAError("the model has no decoder layers to group")
    if groups == "layer":
        return [(i, i) for i in range(n_layers)]
    if groups == "block3" and n_layers > 16:
        a, b = (11, 21) if n_layers > 30 else (8, 16)
        return [(0, a - 1), (a, b - 1), (b, n_layers - 1)]
    if groups.startswith("block") and groups[5:].isdigit():
        n = int(groups[5:])
        if not 1 <= n <= n_layers:
            raise AMAError(
                f"groups {groups!r}: the model has {n_layers} layers, so 1 to {n_layers} blocks"
            )
        size, extra = divmod(n_layers, n)
        out, start = [], 0
        for g in range(n):
            end = start + size + (1 if g < extra else 0)
            out.append((start, end - 1))
            start = end
        return out
    raise AMAError(f"groups {groups!r}: use layer, block3 or blockN (e.g. block4)")


def ratios(logits: torch.Tensor, budget: float, eps: float) -> torch.Tensor:
    """αᵍ = budget·(σ(aᵍ) + ε) / meanₕ(σ(aʰ) + ε): the mean is the budget by construction."""
    r = torch.sigmoid(logits) + eps
    return budget * r / r.mean()


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Encoded:
    """One training example: token ids of the prompt (masked out of the loss) and of the
    response (scored). `source` is "file:line" for messages."""

    prompt: list[int]
    response: list[int]
    source: str = ""


def read_preferences(path: str | Path) -> list[tuple[str, str, str]]:
    """(prompt, chosen response, "file:line") from JSONL lines with "prompt" and
    "chosen" (or "response"); other keys (e.g. "rejected") are ignored."""
    from weightops.io.jsonl import JsonlError, read_jsonl

    path = Path(path)
    try:
        rows = read_jsonl(path, what="preference data")
    except JsonlError as e:
        raise AMAError(str(e)) from e
    out = []
    for n, row in rows:
        where = f"{path}:{n}"
        prompt = row.get("prompt")
        key = "chosen" if "chosen" in row else "response"
        response = row.get(key)
        if not isinstance(prompt, str):
            raise AMAError(f"{where}: needs a string 'prompt' (got {type(prompt).__name__})")
        if not isinstance(response, str) or not response.strip():
            raise AMAError(
                f"{where}: needs a non-empty string 'chosen' (or 'response')",
                hint='each line is {"prompt": …, "chosen": …}',
            )
        out.append((prompt, response, where))
    if not out:
        raise AMAError(f"{path}: no examples (the file is empty)")
    return out


def encode(tokenizer: Any, rows: Sequence[tuple[str, str, str]], max_length: int) -> list[Encoded]:
    """Token ids of each (prompt, response), as the model was trained
    (`weightops.prompting.encode_prompt`: chat template, BOS). Responses are cut to fit `max_length`; a prompt that leaves no
    room for a response token is an error naming its line."""
    out = []
    eos = tokenizer.eos_token_id
    templated = has_chat_template(tokenizer)
    for prompt, response, where in rows:
        try:
            p, r = encode_prompt(tokenizer, prompt, response)
        except PromptError:  # a template that rewrites earlier turns: score the response alone
            p, r = (
                encode_prompt(tokenizer, prompt)[0],
                tokenizer(response, add_special_tokens=False).input_ids,
            )
        if not templated and eos is not None:
            r = [*r, eos]
        if len(p) >= max_length:
            raise AMAError(
                f"{where}: the prompt is {len(p)} tokens, which leaves no room for the "
                f"response within max_length {max_length}",
                hint="raise --max-length or shorten the prompt",
            )
        if not r:
            raise AMAError(f"{where}: the response has no tokens")
        out.append(Encoded(list(p), list(r[: max_length - len(p)]), where))
    return out


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask and labels (-100 on prompt and padding)."""
    width = max(len(e.prompt) + len(e.response) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        seq = e.prompt + e.response
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(e.prompt) : len(seq)] = torch.tensor(e.response)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of a batch."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    out = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device))
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


# ------------------------------------------------------------------ averaged model


class _Coefficients:
    """The current (1 − αᵍ) per group, shared by every hook and parametrization."""

    def __init__(self, n: int) -> None:
        self.value = torch.zeros(n)


class _Blend(torch.nn.Module):
    """Parametrization W = W_pre + (1 − αᵍ)·Δ for a small in-block tensor."""

    def __init__(self, delta: torch.Tensor, coef: _Coefficients, group: int) -> None:
        super().__init__()
        self.register_buffer("delta", delta)
        self._coef = coef
        self.group = group

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return pre + self._coef.value[self.group].to(pre.dtype) * self.delta


@dataclass
class _HookedLinear:
    weight_delta: torch.Tensor
    bias_delta: torch.Tensor | None
    group: int
    transposed: bool  # GPT-2's Conv1D stores [in, out]


class AveragedModel:
    """θ_pre loaded with transformers, made into α·θ_pre + (1 − α)·θ_post with one
    ratio per layer group; set the ratios with `set_ratios` before each forward."""

    def __init__(
        self,
        pre: str | Path,
        post: str | Path,
        groups: Sequence[tuple[int, int]] | str = "layer",
        *,
        budget: float = 0.2,
        others: str = "pre",
        device: str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        from weightops.demo import quiet_transformers
        from weightops.io.checkpoint import Checkpoint
        from weightops.io.safetensors_file import FileReader

        if others not in OTHERS:
            raise AMAError(f"others {others!r}: use one of {', '.join(OTHERS)}")
        quiet_transformers()
        self.pre, self.post, self.others, self.budget = Path(pre), Path(post), others, budget
        post_ckpt = Checkpoint(post)
        pre_ckpt = Checkpoint(pre)
        self.n_layers = num_layers(pre_ckpt.config, pre_ckpt.tensors)
        self.groups = (
            layer_groups(self.n_layers, groups) if isinstance(groups, str) else list(groups)
        )
        self._group_of = {
            layer: g for g, (a, b) in enumerate(self.groups) for layer in range(a, b + 1)
        }
        missing = [i for i in range(self.n_layers) if i not in self._group_of]
        if missing:
            raise AMAError(f"layers {missing} belong to no group")
        kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        self.model = AutoModelForCausalLM.from_pretrained(pre, **kwargs).to(device).eval()
        self.model.requires_grad_(False)
        self.coef = _Coefficients(len(self.groups))
        self.coef.value = self.coef.value.to(device)
        self._linears: dict[str, _HookedLinear] = {}
        self._handles: list[Any] = []
        self.delta_bytes = 0
        with FileReader() as reader:

            def post_tensor(name: str, like: torch.Tensor) -> torch.Tensor:
                info = post_ckpt.info(name)
                if info is None:
                    raise AMAError(f"tensor {name!r} is missing in {post}")
                if tuple(info.shape) != tuple(like.shape):
                    raise AMAError(
                        f"tensor {name!r} has shape {list(info.shape)} in {post} "
                        f"but {list(like.shape)} in {pre}"
                    )
                return reader.read(info).to(device=like.device, dtype=like.dtype)

            self._build(post_tensor)

    def _build(self, post_tensor: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        import torch.nn.utils.parametrize as parametrize

        modules = dict(self.model.named_modules())
        params = dict(self.model.named_parameters())  # tied tensors are listed once
        hooked_bias: set[str] = set()
        for name, p in params.items():
            role = describe(name)
            owner, _, leaf = name.rpartition(".")
            module = modules[owner]
            if is_block_linear(name, tuple(p.shape)) and type(module).__name__ in (
                "Linear",
                "Conv1D",
            ):
                group = self._group_of[role.layer]  # type: ignore[index]
                bias_name = f"{owner}.bias"
                bias_delta = None
                if self.others == "alpha" and bias_name in params:
                    bias_delta = post_tensor(bias_name, params[bias_name]) - params[bias_name]
                    hooked_bias.add(bias_name)
                delta = post_tensor(name, p) - p
                self._linears[owner] = _HookedLinear(
                    delta, bias_delta, group, type(module).__name__ == "Conv1D"
                )
                self.delta_bytes += delta.numel() * delta.element_size()
                self._handles.append(module.register_forward_hook(self._hook(owner)))
        with torch.no_grad():
            for name, p in params.items():
                owner, _, leaf = name.rpartition(".")
                if name in hooked_bias or (owner in self._linears and leaf == "weight"):
                    continue
                role = describe(name)
                linear = is_averaged_linear(name, tuple(p.shape))
                if role.layer is None:
                    # A fixed mix, done once: lm_head at the budget, the rest per `others`.
                    share = (
                        self.budget
                        if linear or self.others == "alpha"
                        else (1.0 if self.others == "pre" else 0.0)
                    )
                    if share < 1.0:
                        p.lerp_(post_tensor(name, p), 1.0 - share)
                elif self.others == "post" and not linear:
                    p.copy_(post_tensor(name, p))
                elif self.others == "alpha" or linear:
                    # In-block tensors the hooks do not cover: norm gains, unusual
                    # projection classes.
                    delta = post_tensor(name, p) - p
                    self.delta_bytes += delta.numel() * delta.element_size()
                    group = self._group_of[role.layer]
                    parametrize.register_parametrization(
                        modules[owner], leaf, _Blend(delta, self.coef, group), unsafe=True
                    )

    def _hook(self, owner: str) -> Callable[..., torch.Tensor]:
        entry = self._linears[owner]
        coef = self.coef

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            c = coef.value[entry.group].to(output.dtype)
            if entry.transposed:
                extra = x @ entry.weight_delta
                if entry.bias_delta is not None:
                    extra = extra + entry.bias_delta
            else:
                extra = torch.nn.functional.linear(x, entry.weight_delta, entry.bias_delta)
            return output + c * extra

        return hook

    def set_ratios(self, alpha: torch.Tensor) -> None:
        """Use θ_pre share αᵍ for group g (a differentiable tensor, clamped to ≤ 1)."""
        self.coef.value = 1.0 - alpha.clamp(max=1.0).to(self.coef.value.device)

    def close(self) -> None:
        """Remove the hooks (the model stays as θ_pre with the fixed mixes applied)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ---------------------------------------------------------------------------- search


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
