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
        self.block = find_layers(model).blocks[depth_read - 1]
        self.batches = batches
        self.count = sum(len(b["last"]) for b in batches)

    def _states(self, batch: dict[str, Any]) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            seen.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = self.block.register_forward_hook(hook)
        try:
            self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,
            )
        except _Stop:
            pass
        finally:
            handle.remove()
        rows = torch.arange(len(batch["last"]), device=seen[0].device)
        return seen[0][rows, batch["last"].to(seen[0].device)].float()

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
        with torch.enable_grad():
            for b in self.batches:
                (self._states(b).sum(0) @ upstream / self.count).backward()
        return float(-loss.detach())

    def cos(self, target: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(self.mean(), target, dim=0))


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
            a = aligned[n].reshape(-1)[idx.to(aligned[n].device)].cpu()
            vals = torch.where(keep, a.to(ft.dtype), ft)
            p.view(-1)[idx.to(p.device)] = vals.to(p.device, p.dtype)
