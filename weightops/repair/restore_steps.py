"""The mechanics of alignment restoration (weightops.repair.restore describes the method):
the pool of weights and one run of recovery and rollback steps (the mean hidden state
and its gradient are read by weightops.repair.restore_reader)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from weightops.arch import describe
from weightops.repair.precision import release_freed
from weightops.repair.restore_reader import _Reader
from weightops.repair.restore_select import Shortlist, split, top

_NORM_ROLES = ("norm", "qk_norm")


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
        # Where each tensor starts in the pool's order, and the tensors of each block.
        self.offsets: dict[str, int] = {}
        self.blocks: dict[int, list[str]] = {}
        offset = 0
        for n, p in pool.items():
            self.offsets[n] = offset
            offset += p.numel()
            self.blocks.setdefault(describe(n).layer, []).append(n)  # type: ignore[arg-type]

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
        short = Shortlist(k)

        def score(block: int) -> None:
            # Scored one tensor at a time as its block's gradients are complete, each
            # gradient freed as soon as it is read.
            for n in self.blocks.get(block, ()):
                p = self.pool[n].detach()
                g = self.pool[n].grad
                self.pool[n].grad = None
                if g is None:
                    continue
                diff = torch.sign(p - self.aligned[n]).view(-1)
                g = g.view(-1)
                cand = (diff != 0) & (diff == torch.sign(g)) & self._untouched(n, p.device)
                where = cand.nonzero(as_tuple=True)[0]
                short.add(g[where].abs().cpu(), where.cpu() + self.offsets[n])

        reader.backward_cos(h_star, score)
        names = list(self.pool)
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
        grads = {}

        def gather(block: int) -> None:
            for n in self.blocks.get(block, ()):
                p = self.pool[n]
                if n in picked and p.grad is not None:
                    grads[n] = p.grad.reshape(-1)[picked[n].to(p.device)].cpu()
                p.grad = None

        reader.backward_cos(b_star, gather)
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
