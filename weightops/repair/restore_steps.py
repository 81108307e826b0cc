"""The mechanics of alignment restoration (weightops.repair.restore describes the method):
reading the mean hidden state and its gradient, the pool of weights, and one run of
recovery and rollback steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from weightops.arch import describe
from weightops.repair.precision import release_freed
from weightops.repair.restore_select import Shortlist, split, top
from weightops.steering.layers import find_layers

_NORM_ROLES = ("norm", "qk_norm")


class _Stop(Exception):
    """Ends a forward pass once the block we read from has run."""


class _Reader:
    """Mean state at layer L (output of block L − 1) at the last prompt token."""

    def __init__(self, model: nn.Module, depth_read: int, batches: list[dict[str, Any]]):
        self.model = model
        self.blocks = list(find_layers(model).blocks[:depth_read])
        self.block = self.blocks[-1]
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

        handle = self.block.register_forward_hook(hook)
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

    def backward_cos(self, target: torch.Tensor) -> float:
        """Accumulate ∇(−cos(mean, target)) into .grad; return cos(mean, target)."""
        m = self.mean().double().requires_grad_(True)
        loss = -torch.nn.functional.cosine_similarity(m, target.double(), dim=0)
        (upstream,) = torch.autograd.grad(loss, m)
        upstream = upstream.float()
        for b in self.batches:
            calls = self._block_inputs(b)
            if calls is None:
                with torch.enable_grad():
                    (self._states(b).sum(0) @ upstream / self.count).backward()
            else:
                self._backward_blocks(b, calls, upstream)
        return float(-loss.detach())

    def _block_inputs(self, batch: dict[str, Any]) -> list[tuple[tuple, dict]] | None:
        """The arguments each block is called with, from a pass without gradients that
        stops before the last block runs; None when a block's input is not the output
        of the block before (something between them that a per-block backward would
        not see)."""
        calls: list[tuple[tuple, dict]] = []
        outputs: list[torch.Tensor] = []

        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((args, kwargs))
            if module is self.block:
                raise _Stop

        def after(module: nn.Module, args: tuple, output: Any) -> None:
            outputs.append(_hidden(output))

        handles = [b.register_forward_pre_hook(before, with_kwargs=True) for b in self.blocks]
        handles += [b.register_forward_hook(after) for b in self.blocks[:-1]]
        try:
            with torch.no_grad():
                self._run(batch)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        chained = all(_input(calls[i + 1]) is out for i, out in enumerate(outputs)) and len(
            calls
        ) == len(self.blocks)
        return calls if chained else None

    def _backward_blocks(
        self, batch: dict[str, Any], calls: list[tuple[tuple, dict]], upstream: torch.Tensor
    ) -> None:
        """What `.backward()` through the whole batch's graph does, one block's graph at
        a time: each block is run again from its saved input, last block first, and
        the gradient at its input is handed to the block before. Every operation of the
        whole graph runs, on the same values and in the same order, so the gradients
        are the same bit for bit."""
        grad = None
        for i in range(len(self.blocks) - 1, -1, -1):
            args, kwargs = calls[i]
            x = _input(calls[i]).detach().requires_grad_(i > 0)
            if args:
                args = (x, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": x}
            with torch.enable_grad():
                y = _hidden(self.blocks[i](*args, **kwargs))
                if grad is None:
                    (_last(y, batch).sum(0) @ upstream / self.count).backward()
                else:
                    y.backward(grad)
            grad = x.grad

    def cos(self, target: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(self.mean(), target, dim=0))


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _input(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _last(states: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The states at each prompt's last token, in float32."""
    rows = torch.arange(len(batch["last"]), device=states.device)
    return states[rows, batch["last"].to(states.device)].float()


def _pool(model: nn.Module, layers: int) -> dict[str, nn.Parameter]:
    """Parameters of decoder blocks 0 … layers − 1, norms excluded."""
    out = {}
    for name, p in model.named_parameters():
        role = describe(name)
        if role.layer is not None and role.layer < layers and role.role not in _NORM_ROLES:
            out[name] = p
    return out


def _batches(
    examples: Sequence[Any], tokenizer: Any, device: torch.device, batch_size: int
) -> list[dict[str, Any]]:
    from weightops.repair.data import batches

    return list(
        batches(
            list(examples),
            tokenizer,
            batch_size=batch_size,
            with_response=False,
            device=str(device),
        )
    )


class _Run:
    """One pass of recovery steps from the fine-tuned model.

    What the run did is kept as events, (indices, step) per tensor: +step where a step
    restored weights, −step where it rolled them back. A weight is touched at most once
    per run, so a dense record is only built one tensor at a time, when asked for."""

    def __init__(
        self,
        pool: dict[str, nn.Parameter],
        aligned: Mapping[str, torch.Tensor],
        saved: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        seed: int,
    ):
        self.pool, self.aligned, self.saved = pool, aligned, saved
        self.events: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def when(self, name: str) -> torch.Tensor:
        """The step record of one tensor (int16, its shape): see RestoreResult.restored_at."""
        out = torch.zeros(self.pool[name].shape, dtype=torch.int16)
        for idx, step in self.events.get(name, ()):
            out.view(-1)[idx] = step
        return out

    def _untouched(self, name: str, device: torch.device) -> torch.Tensor:
        free = torch.ones(self.pool[name].numel(), dtype=torch.bool)
        for idx, _ in self.events.get(name, ()):
            free[idx] = False
        return free.to(device)

    def recover(self, step: int, reader: _Reader, h_star: torch.Tensor, k: int) -> dict:
        reader.backward_cos(h_star)
        names = list(self.pool)
        short = Shortlist(k)
        offset = 0
        for n in names:
            # Scored one tensor at a time, its gradient freed as soon as it is read.
            p = self.pool[n].detach()
            g = self.pool[n].grad
            self.pool[n].grad = None
            if g is not None:
                diff = torch.sign(p - self.aligned[n]).view(-1)
                g = g.view(-1)
                cand = (diff != 0) & (diff == torch.sign(g)) & self._untouched(n, p.device)
                where = cand.nonzero(as_tuple=True)[0]
                short.add(g[where].abs().cpu(), where.cpu() + offset)
            offset += p.numel()
        chosen = short.top(self.gen)
        picked = split(chosen, names, [self.pool[n].numel() for n in names])
        with torch.no_grad():
            for n, idx in picked.items():
                p = self.pool[n]
                view = p.view(-1)
                dev_idx = idx.to(p.device)
                self.saved.setdefault(n, []).append((idx, view[dev_idx].detach().cpu().clone()))
                view[dev_idx] = self.aligned[n].reshape(-1)[dev_idx].to(p.dtype)
                self.events.setdefault(n, []).append((idx, step))
        release_freed()  # the gradients, before the task metric widens the deep blocks
        return picked

    def roll_back(
        self,
        step: int,
        picked: dict[str, torch.Tensor],
        reader: _Reader,
        b_star: torch.Tensor,
        fraction: float,
    ) -> int:
        n_restored = sum(len(i) for i in picked.values())
        count = round(fraction * n_restored)
        if count == 0:
            return 0
        reader.backward_cos(b_star)
        grads = {}
        for n, p in self.pool.items():
            if n in picked and p.grad is not None:
                grads[n] = p.grad.reshape(-1)[picked[n].to(p.device)].cpu()
            p.grad = None
        names = list(picked)
        scores = []
        for n in names:
            idx = picked[n]
            p = self.pool[n].detach().reshape(-1)[idx.to(self.pool[n].device)].cpu()
            ft = self.saved[n][-1][1]  # the values this step overwrote
            g = grads.get(n, torch.zeros(len(idx), dtype=p.dtype))
            diff = torch.sign(p.float() - ft.float())
            back = (diff != 0) & (diff == torch.sign(g))
            scores.append(torch.where(back, g.abs().float(), torch.full_like(g, -1.0).float()))
        flat = torch.cat(scores)
        take = min(count, int((flat > 0).sum()))
        chosen = top(flat, take, self.gen)
        with torch.no_grad():
            for n, local in split(chosen, names, [len(picked[n]) for n in names]).items():
                idx = picked[n][local]
                ft = self.saved[n][-1][1][local]
                p = self.pool[n]
                p.view(-1)[idx.to(p.device)] = ft.to(p.device, p.dtype)
                self.events[n].append((idx, -step))
        return take


def _apply(
    pool: dict[str, nn.Parameter],
    aligned: Mapping[str, torch.Tensor],
    saved: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    run: _Run | None,
    upto: int,
) -> None:
    """Put the pool into a run's state after step `upto` (None: the fine-tune)."""
    with torch.no_grad():
        for n, chunks in saved.items():
            idx = torch.cat([c[0] for c in chunks])
            ft = torch.cat([c[1] for c in chunks])
            p = pool[n]
            if run is None:
                keep = torch.zeros(len(idx), dtype=torch.bool)
            else:
                w = run.when(n).reshape(-1)[idx]
                keep = (w > 0) & (w <= upto)
            values = aligned[n]  # read from the checkpoint where it is not held
            a = values.reshape(-1)[idx.to(values.device)].cpu()
            vals = torch.where(keep, a.to(ft.dtype), ft)
            p.view(-1)[idx.to(p.device)] = vals.to(p.device, p.dtype)
