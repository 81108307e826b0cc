"""The mean hidden state that alignment restoration reads (weightops.repair.restore
describes the method), and its gradient taken one block at a time.

The state is the output of block L − 1 at each prompt's last token, averaged over all
prompts. The gradient of a function of that mean is taken in two passes: the mean
first, without gradients, then the gradient at the mean pushed back through each
batch. Pushed back through a batch's whole graph, that would hold the graph of L
blocks per batch and the gradients of every block of the pool at once. Instead the
gradient goes back one block at a time, last block first: block i is run again for
each batch from its input (a pass without gradients that stops there), and the
gradient at its input is kept per batch for block i − 1. Once every batch has gone
through block i, that block's gradients are complete and handed to the caller, who
reads and frees them. Alive at once: one block's graph, one block's gradients and the
gradient at one block boundary for every batch. The cost is the passes without
gradients up to each block, L(L − 1)/2 block evaluations per batch instead of L − 1.

Every operation of the whole graph runs, on the same values, and each weight's
gradient is summed over the batches in the same order, so the gradients are those of
the whole graph bit for bit. This needs each block's input to be the previous block's
output; for a model where something comes between them, the gradient goes through the
whole graph of each batch instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from weightops.steering.layers import find_layers


class _Stop(Exception):
    """Ends a forward pass once the block we read from has run (or is about to)."""


class _Reader:
    """Mean state at layer L (output of block L − 1) at the last prompt token."""

    def __init__(self, model: nn.Module, depth_read: int, batches: list[dict[str, Any]]):
        self.model = model
        self.blocks = list(find_layers(model).blocks[:depth_read])
        self.batches = batches
        self.count = sum(len(b["last"]) for b in batches)

    def _run(self, batch: dict[str, Any]) -> None:
        self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        )

    def _states(self, batch: dict[str, Any]) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            seen.append(_hidden(output))
            raise _Stop

        handle = self.blocks[-1].register_forward_hook(hook)
        try:
            self._run(batch)
        except _Stop:
            pass
        finally:
            handle.remove()
        return _last(seen[0], batch)

    @torch.no_grad()
    def mean(self) -> torch.Tensor:
        total = sum(self._states(b).sum(0) for b in self.batches)
        return total / self.count  # type: ignore[operator]

    def cos(self, target: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(self.mean(), target, dim=0))

    def backward_cos(self, target: torch.Tensor, on_block: Callable[[int], None]) -> float:
        """Accumulate ∇(−cos(mean, target)) into .grad, calling `on_block(i)` once the
        gradients of block i are complete, last block first (the caller reads them and
        sets them to None); return cos(mean, target)."""
        m = self.mean().double().requires_grad_(True)
        loss = -torch.nn.functional.cosine_similarity(m, target.double(), dim=0)
        (upstream,) = torch.autograd.grad(loss, m)
        upstream = upstream.float()
        if not self._by_block(upstream, on_block):
            with torch.enable_grad():
                for b in self.batches:
                    (self._states(b).sum(0) @ upstream / self.count).backward()
            for i in range(len(self.blocks) - 1, -1, -1):
                on_block(i)
        return float(-loss.detach())

    def _by_block(self, upstream: torch.Tensor, on_block: Callable[[int], None]) -> bool:
        """The gradient one block at a time (module docstring); False, having done
        nothing, when the blocks do not chain."""
        last = len(self.blocks) - 1
        # Per batch, the gradient at the output of the block being worked on.
        grads: list[torch.Tensor | None] = [None] * len(self.batches)
        for i in range(last, -1, -1):
            for k, batch in enumerate(self.batches):
                call = self._call(batch, i, check=i == last and k == 0)
                if call is None:
                    return False
                args, kwargs = call
                x = _input(call).detach().requires_grad_(i > 0)
                if args:
                    args = (x, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": x}
                with torch.enable_grad():
                    y = _hidden(self.blocks[i](*args, **kwargs))
                    if i == last:
                        (_last(y, batch).sum(0) @ upstream / self.count).backward()
                    else:
                        y.backward(grads[k])
                grads[k] = x.grad
            on_block(i)
        return True

    def _call(self, batch: dict[str, Any], i: int, check: bool) -> tuple[tuple, dict] | None:
        """The arguments block i is called with on `batch`, from a pass without
        gradients that stops before block i runs. With `check`, None unless each block
        before it is given the previous block's output."""
        calls: list[tuple[tuple, dict]] = []
        outputs: list[torch.Tensor] = []

        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((args, kwargs))
            if module is self.blocks[i]:
                raise _Stop

        def after(module: nn.Module, args: tuple, output: Any) -> None:
            outputs.append(_hidden(output))

        handles = [
            b.register_forward_pre_hook(before, with_kwargs=True) for b in self.blocks[: i + 1]
        ]
        if check:
            handles += [b.register_forward_hook(after) for b in self.blocks[:i]]
        try:
            with torch.no_grad():
                self._run(batch)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if check and not (
            len(calls) == i + 1
            and all(_input(calls[j + 1]) is out for j, out in enumerate(outputs))
        ):
            return None
        return calls[-1]


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _input(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _last(states: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The states at each prompt's last token, in float32."""
    rows = torch.arange(len(batch["last"]), device=states.device)
    return states[rows, batch["last"].to(states.device)].float()
