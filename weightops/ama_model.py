"""The averaged model that AMA's search trains: θ_pre loaded once, each blended
tensor's Δ = θ_post − θ_pre beside it, and per-group ratios αᵍ applied by hooks and
parametrizations (see weightops.ama for the method)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightops.arch import describe, is_block_linear, num_layers
from weightops.errors import WeightopsError
from weightops.merge.model_averaging import is_averaged_linear

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
