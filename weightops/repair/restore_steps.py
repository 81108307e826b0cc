"""The mechanics of alignment restoration (weightops.repair.restore describes the method):
reading the mean hidden state and its gradient, the pool of weights, and one run of
recovery and rollback steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from weightops.arch import describe
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


def _top(scores: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of the k largest scores (k ≤ number of positive scores); ties at the k-th
    value are drawn at random from `gen`, so a run is reproducible from its seed."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    kth = torch.topk(scores, k, sorted=True).values[-1]
    above = (scores > kth).nonzero(as_tuple=True)[0]
    tied = (scores == kth).nonzero(as_tuple=True)[0]
    need = k - len(above)
    pick = tied[torch.randperm(len(tied), generator=gen)[:need]]
    return torch.cat([above, pick.to(above.device)])


def _split(chosen: torch.Tensor, names: list[str], sizes: list[int]) -> dict[str, torch.Tensor]:
    """Indices into the concatenation of parts of `sizes` elements, split back into
    sorted indices within each part (parts with none left out)."""
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    chosen = chosen.sort().values
    out = {}
    for i, n in enumerate(names):
        local = chosen[(chosen >= bounds[i]) & (chosen < bounds[i + 1])] - bounds[i]
        if len(local):
            out[n] = local
    return out


class _Run:
    """One pass of recovery steps from the fine-tuned model."""

    def __init__(
        self,
        pool: dict[str, nn.Parameter],
        aligned: dict[str, torch.Tensor],
        saved: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        seed: int,
    ):
        self.pool, self.aligned, self.saved = pool, aligned, saved
        self.when = {n: torch.zeros(p.shape, dtype=torch.int16) for n, p in pool.items()}
        self.gen = torch.Generator().manual_seed(seed)

    def _grads(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.pool.items():
            g = p.grad
            out[n] = torch.zeros_like(p) if g is None else g.detach()
            p.grad = None
        return out

    def recover(self, step: int, reader: _Reader, h_star: torch.Tensor, k: int) -> dict:
        reader.backward_cos(h_star)
        grads = self._grads()
        names = list(self.pool)
        scores = []
        for n in names:
            p, g = self.pool[n].detach(), grads[n]
            diff = torch.sign(p - self.aligned[n])
            cand = (diff != 0) & (diff == torch.sign(g)) & (self.when[n] == 0).to(p.device)
            scores.append(torch.where(cand, g.abs(), torch.full_like(g, -1.0)).flatten().cpu())
        flat = torch.cat(scores)
        take = min(k, int((flat > 0).sum()))
        chosen = _top(flat, take, self.gen)
        picked = _split(chosen, names, [self.pool[n].numel() for n in names])
        with torch.no_grad():
            for n, idx in picked.items():
                p = self.pool[n]
                view = p.view(-1)
                dev_idx = idx.to(p.device)
                self.saved.setdefault(n, []).append((idx, view[dev_idx].detach().cpu().clone()))
                view[dev_idx] = self.aligned[n].reshape(-1)[dev_idx].to(p.dtype)
                self.when[n].view(-1)[idx] = step
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
        grads = self._grads()
        names = list(picked)
        scores = []
        for n in names:
            idx = picked[n]
            p = self.pool[n].detach().reshape(-1)[idx.to(self.pool[n].device)].cpu()
            ft = self.saved[n][-1][1]  # the values this step overwrote
            g = grads[n].reshape(-1)[idx.to(grads[n].device)].cpu()
            diff = torch.sign(p.float() - ft.float())
            back = (diff != 0) & (diff == torch.sign(g))
            scores.append(torch.where(back, g.abs().float(), torch.full_like(g, -1.0).float()))
        flat = torch.cat(scores)
        take = min(count, int((flat > 0).sum()))
        chosen = _top(flat, take, self.gen)
        with torch.no_grad():
            for n, local in _split(chosen, names, [len(picked[n]) for n in names]).items():
                idx = picked[n][local]
                ft = self.saved[n][-1][1][local]
                p = self.pool[n]
                p.view(-1)[idx.to(p.device)] = ft.to(p.device, p.dtype)
                self.when[n].view(-1)[idx] = -step
        return take


def _apply(
    pool: dict[str, nn.Parameter],
    aligned: dict[str, torch.Tensor],
    saved: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    when: dict[str, torch.Tensor] | None,
    upto: int,
) -> None:
    """Put the pool into a run's state after step `upto` (None: the fine-tune)."""
    with torch.no_grad():
        for n, chunks in saved.items():
            idx = torch.cat([c[0] for c in chunks])
            ft = torch.cat([c[1] for c in chunks])
            p = pool[n]
            if when is None:
                keep = torch.zeros(len(idx), dtype=torch.bool)
            else:
                w = when[n].reshape(-1)[idx]
                keep = (w > 0) & (w <= upto)
            a = aligned[n].reshape(-1)[idx.to(aligned[n].device)].cpu()
            vals = torch.where(keep, a.to(ft.dtype), ft)
            p.view(-1)[idx.to(p.device)] = vals.to(p.device, p.dtype)
