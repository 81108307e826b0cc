"""The agreement rule of restoration by answers (`weightops.repair.restore_answers`):
the mean refusal gradient, scaled per weight by how many requests gain from restoring
it minus how many lose, over the number of requests.

Each request's gradient is the gradient of the mean negative log-likelihood of its
answers' tokens. Only its sign enters the votes, so no request's gradient of the whole
pool is ever kept:

- Requests with at most `batch_size` answers are packed, whole, into batches, and one
  forward and backward pass serves every request of a batch. Each token's loss is
  divided by its request's token count, so the gradient at each row is the one that
  request's own pass would give (rows do not see each other). For a linear layer of the
  pool, the request's weight gradient is Σ over its tokens of the output gradient times
  the input, both read by hooks as the backward pass reaches the layer; the votes and
  the mean are added up there and the layer's per-request matrices dropped, so only
  one layer's [out, in] matrix lives at a time. The pool's weights take no gradient of
  their own in that pass (the input embedding's output does, to carry it down).
- A request with more answers than a batch holds, or every request when the pool has
  parameters outside linear layers (a per-token sum does not give their gradient), has
  a gradient pass of its own, as without the rule.

On the real model of docs/repair.md (16 requests of one answer each), one step's
gradients took one pass per answer and 16 sweeps over the 106 M weights of the pool
before; they now take two batched passes.

Memory: the mean gradient (the pool's dtype), the votes (int16) and the restoring
move's sign (int8), each pool-sized; during a batched pass, the activations autograd
keeps anyway, and one layer's gradient matrix.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import nn

from weightops.repair.antidote_task import _mean_log_likelihood_grad, response_nll
from weightops.repair.data import Example, batches, context_length


def nll_grads(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], pool: dict[str, nn.Parameter],
    batch_size: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """∇ of the mean negative log-likelihood of the examples' response tokens, per
    pool tensor (zeros where it has none)."""
    _mean_log_likelihood_grad(model, tokenizer, examples, batch_size)
    out = {}
    for n, p in pool.items():
        out[n] = torch.zeros_like(p) if p.grad is None else -p.grad.detach()
        p.grad = None
    return out


def _linear_owners(
    model: nn.Module, pool: dict[str, nn.Parameter]
) -> dict[nn.Linear, dict[str, str]] | None:
    """{linear module: {"weight"/"bias": pool name}} covering the whole pool, or None
    when some pool parameter is not a linear layer's weight or bias."""
    owners: dict[nn.Linear, dict[str, str]] = {}
    for name in pool:
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path) if path else model
        if not isinstance(module, nn.Linear) or attr not in ("weight", "bias"):
            return None
        owners.setdefault(module, {})[attr] = name
    return owners


def _packs(groups: list[list[Example]], size: int) -> list[list[list[Example]]]:
    """Consecutive groups gathered into batches of at most `size` examples."""
    out: list[list[list[Example]]] = []
    count = size
    for g in groups:
        if count + len(g) > size:
            out.append([])
            count = 0
        out[-1].append(g)
        count += len(g)
    return out


class _Tally:
    """The running mean gradient and votes of the pool (module docstring)."""

    def __init__(self, pool: dict[str, nn.Parameter], aligned: dict[str, torch.Tensor],
                 n_groups: int, total: int) -> None:  # fmt: skip
        self.total, self.n_groups = total, n_groups
        self.mean = {n: torch.zeros_like(p) for n, p in pool.items()}
        # The gain's sign is the gradient's times the restoring move's, the same move
        # for every request, so the move's sign is taken once (one byte a weight).
        self.side = {n: torch.sign(p.detach() - aligned[n]).to(torch.int8) for n, p in pool.items()}
        kind = torch.int16 if n_groups < 2**15 else torch.int32
        self.votes = {n: torch.zeros(p.shape, dtype=kind) for n, p in pool.items()}

    def add(self, name: str, grads: Sequence[torch.Tensor], sizes: Sequence[int]) -> None:
        """Count the requests' gradients of one tensor (`sizes`: their answers)."""
        signs = torch.zeros_like(grads[0])
        for g, size in zip(grads, sizes, strict=True):
            self.mean[name].add_(g.to(self.mean[name].dtype), alpha=size / self.total)
            signs += torch.sign(g)
        side = self.side[name].to(signs.device)
        self.votes[name] += (signs * side).to(self.votes[name].dtype).cpu()

    def scaled(self) -> dict[str, torch.Tensor]:
        return {
            n: m * torch.clamp(self.votes[n].to(m.device, m.dtype) / self.n_groups, min=0)
            for n, m in self.mean.items()
        }


def _packed_pass(
    model: nn.Module, tokenizer: Any, groups: list[list[Example]],
    owners: dict[nn.Linear, dict[str, str]], tally: _Tally,
) -> None:  # fmt: skip
    """One forward and backward pass over whole groups; each group's gradient of every
    linear layer of the pool is counted as the backward pass reaches the layer."""
    device = next(model.parameters()).device
    examples = [ex for g in groups for ex in g]
    (b,) = batches(examples, tokenizer, batch_size=len(examples), with_response=True,
                   max_length=context_length(model), device=device)  # fmt: skip
    rows, start = [], 0
    for g in groups:
        rows.append(slice(start, start + len(g)))
        start += len(g)
    # Each row's tokens weigh 1 / (its group's response tokens): the group's mean.
    counts = (b["labels"][:, 1:] != -100).sum(-1)
    weight = torch.empty(len(examples), device=device)
    for r in rows:
        weight[r] = 1.0 / counts[r].sum().clamp(min=1)
    mask = b["attention_mask"].bool()
    sizes = [len(g) for g in groups]
    inputs: dict[nn.Module, list[torch.Tensor]] = {}

    def grads_of(module: nn.Linear, out_grad: torch.Tensor) -> None:
        x = inputs[module].pop()
        per_group: dict[str, list[torch.Tensor]] = {a: [] for a in owners[module]}
        for r in rows:
            keep = mask[r]
            go, xi = out_grad[r][keep].float(), x[r][keep].float()
            if "weight" in per_group:
                per_group["weight"].append(go.T @ xi)
            if "bias" in per_group:
                per_group["bias"].append(go.sum(0))
        for attr, name in owners[module].items():
            tally.add(name, per_group[attr], sizes)

    def on_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs.setdefault(module, []).append(args[0].detach())
        output.register_hook(lambda g: grads_of(module, g))

    def carry(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    hooks = [m.register_forward_hook(on_forward) for m in owners]
    hooks.append(model.get_input_embeddings().register_forward_hook(carry))
    try:
        nll, rows_of = response_nll(model, b)
        (nll * weight[rows_of]).sum().backward()
    finally:
        for h in hooks:
            h.remove()


def agreed_grads(
    model: nn.Module, tokenizer: Any, by_group: dict[Hashable, list[Example]],
    pool: dict[str, nn.Parameter], aligned: dict[str, torch.Tensor], batch_size: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The mean refusal gradient over all groups' answers, scaled per weight by the
    groups' agreement on the sign of the gain of restoring it (module docstring).
    The pool's parameters are expected to require gradients, and are left so."""
    groups = list(by_group.values())
    tally = _Tally(pool, aligned, len(groups), sum(len(g) for g in groups))
    owners = _linear_owners(model, pool)
    small = [g for g in groups if len(g) <= batch_size]
    for g in groups if owners is None else [g for g in groups if len(g) > batch_size]:
        grads = nll_grads(model, tokenizer, g, pool, batch_size)
        for n in pool:
            tally.add(n, [grads[n]], [len(g)])
    if owners is not None and small:
        for p in pool.values():
            p.requires_grad_(False)
        try:
            for pack in _packs(small, batch_size):
                _packed_pass(model, tokenizer, pack, owners, tally)
        finally:
            for p in pool.values():
                p.requires_grad_(True)
    return tally.scaled()
