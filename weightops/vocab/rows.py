"""Each input's embedding rows, re-indexed to the merged vocabulary as they are read.

For one vocabulary tensor (the embedding or lm_head) every input model gets a matrix
with one row per merged token: its own row for the token when it has one, else the
token's default, decided as mergekit decides it (per token, over the models merged in
that tensor):

- a token set under `tokenizer.tokens` takes its given source: a model's row for the
  same token, a model's row for another token (`model_token`), or zeros;
- else a token only one model has takes that model's row;
- a token no model has is zeros;
- a token the base model has takes the base's row;
- otherwise the mean of the rows of the models that have it.

`force: true` gives every model the default, even those that have the token. Rows
added by `pad_to_multiple_of` are each model's mean re-indexed row. The merge method
then runs on these matrices unchanged. Rows are gathered from disk for the rows being
merged only, in runs of nearby ids, so a tensor is never read whole at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from weightops.vocab.config import TokenSettings, TokenSource

# Rows closer than this are read as one run (the rows between are read and dropped).
_GAP = 64

# fetch(model, r0, r1): rows [r0, r1) of that model's stored tensor, in the compute
# dtype, with any alignment applied.
Fetch = Callable[[int, int, int], torch.Tensor]


@dataclass
class Reindex:
    """How the rows of one vocabulary tensor are made for each of its inputs."""

    own: dict[int, torch.Tensor]  # model -> its row for each token, -1 for the default
    defaults: dict[int, tuple[tuple[int, int], ...]]  # token -> (model, row)s averaged
    real: int  # tokens in the merged vocabulary
    size: int  # rows of the output (real plus padding)
    hidden: int
    kinds: Counter[str] = field(default_factory=Counter)
    pads: dict[int, torch.Tensor] = field(default_factory=dict)  # set before merging

    def __post_init__(self) -> None:
        self._default_rows = torch.tensor(sorted(self.defaults), dtype=torch.long)

    @property
    def identity(self) -> bool:
        """Whether every input is read as stored (nothing to re-index)."""
        every = torch.arange(self.real)
        return self.size == self.real and all(torch.equal(o, every) for o in self.own.values())

    def gather(
        self, rows: tuple[int, int] | None, fetch: Fetch, dtype: torch.dtype
    ) -> dict[int, torch.Tensor]:
        """Rows [r0, r1) (all with None) of every input's re-indexed matrix."""
        r0, r1 = rows or (0, self.size)
        top = max(r0, min(r1, self.real))
        lo, hi = torch.searchsorted(self._default_rows, torch.tensor([r0, top])).tolist()
        drows = self._default_rows[lo:hi].tolist()
        # Each default row is the mean of its (model, row) sources: list them per model,
        # so that each model's rows are read and added in one go.
        wanted: dict[int, tuple[list[int], list[int]]] = {}
        counts = []
        for k, r in enumerate(drows):
            counts.append(max(1, len(self.defaults[r])))
            for m, j in self.defaults[r]:
                slots, ids = wanted.setdefault(m, ([], []))
                slots.append(k)
                ids.append(j)
        need = {m: [o[r0:top]] for m, o in self.own.items()}
        for m, (_, ids) in wanted.items():
            need.setdefault(m, []).append(torch.tensor(ids, dtype=torch.long))
        read = {
            m: _read(fetch, m, torch.cat(parts), dtype, self.hidden) for m, parts in need.items()
        }
        dvals = torch.zeros((len(drows), self.hidden), dtype=dtype)
        for m, (slots, ids) in wanted.items():
            dvals.index_add_(0, torch.tensor(slots), _lookup(read[m], torch.tensor(ids)))
        dvals /= torch.tensor(counts, dtype=dtype).unsqueeze(1)
        local = torch.tensor(drows, dtype=torch.long) - r0
        out = {}
        for m, o in self.own.items():
            t = torch.empty((r1 - r0, self.hidden), dtype=dtype)
            t[local] = dvals
            mine = o[r0:top]
            present = (mine >= 0).nonzero().squeeze(1)
            t[present] = _lookup(read[m], mine[present])
            if r1 > top:
                t[top - r0 :] = self.pads[m].to(dtype)
            out[m] = t
        return out

    def compute_pads(self, fetch: Fetch, dtype: torch.dtype, block_elements: int) -> None:
        """Each input's padding row: the mean of its re-indexed token rows."""
        if self.size == self.real:
            return
        sums = {m: torch.zeros(self.hidden, dtype=torch.float64) for m in self.own}
        step = max(1, block_elements // max(1, self.hidden))
        for r0 in range(0, self.real, step):
            block = self.gather((r0, min(self.real, r0 + step)), fetch, dtype)
            for m, t in block.items():
                sums[m] += t.sum(0, dtype=torch.float64)
        self.pads = {m: (s / self.real).to(dtype) for m, s in sums.items()}


def _read(
    fetch: Fetch, model: int, wanted: torch.Tensor, dtype: torch.dtype, hidden: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted ids, their rows) for the ids >= 0 in `wanted`, read in runs."""
    ids = torch.unique(wanted[wanted >= 0])
    if ids.numel() == 0:
        return ids, torch.empty((0, hidden), dtype=dtype)
    values = ids.tolist()
    parts, start = [], 0
    for k in range(1, len(values) + 1):
        if k == len(values) or values[k] - values[k - 1] > _GAP:
            a, b = values[start], values[k - 1] + 1
            block = fetch(model, a, b)
            if b - a != k - start:
                block = block.index_select(0, ids[start:k] - a)
            parts.append(block)
            start = k
    return ids, torch.cat(parts) if len(parts) > 1 else parts[0]


def _lookup(read: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    sorted_ids, data = read
    return data.index_select(0, torch.searchsorted(sorted_ids, ids))


def build_reindex(
    tokens: list[str],
    vocabs: dict[int, dict[str, int]],
    rows: dict[int, int],
    base: int | None,
    settings: dict[str, TokenSettings],
    model_index: dict[str, int],
    size: int,
    hidden: int,
) -> tuple[Reindex, list[str]]:
    """The row map of one tensor merged from the models in `vocabs` (model -> its
    token -> row; `rows`: its tensor's row count); also the problems found."""
    problems: list[str] = []
    own_lists = {
        m: [j if (j := vocab.get(t, -1)) < rows[m] else -1 for t in tokens]
        for m, vocab in vocabs.items()
    }
    models = list(vocabs)
    defaults: dict[int, tuple[tuple[int, int], ...]] = {}
    kinds: Counter[str] = Counter()
    for r, token in enumerate(tokens):
        cfg = settings.get(token)
        force = cfg is not None and cfg.force
        has = [m for m in models if own_lists[m][r] >= 0]
        source = cfg.source if cfg is not None else None
        if source is not None:
            # Checked even where no model needs it, so a wrong entry never passes silently.
            found = _configured(token, source, r, own_lists, vocabs, rows, model_index)
            if isinstance(found, str):
                problems.append(found)
                continue
        if len(has) == len(models) and not force:
            continue
        if source is None:
            if len(has) == 1:
                kind, chosen = "only", ((has[0], own_lists[has[0]][r]),)
            elif not has:
                kind, chosen = "zero", ()
            elif base in has:
                kind, chosen = "base", ((base, own_lists[base][r]),)
            else:
                kind, chosen = "mean", tuple((m, own_lists[m][r]) for m in has)
        else:
            kind, chosen = "set", found
        kinds[kind] += 1
        kinds["forced"] += force
        defaults[r] = chosen
        if force:
            for m in models:
                own_lists[m][r] = -1
    own = {m: torch.tensor(v, dtype=torch.long) for m, v in own_lists.items()}
    return Reindex(own, defaults, len(tokens), size, hidden, kinds), problems


def _configured(
    token: str,
    source: TokenSource | str,
    r: int,
    own: dict[int, list[int]],
    vocabs: dict[int, dict[str, int]],
    rows: dict[int, int],
    model_index: dict[str, int],
) -> tuple[tuple[int, int], ...] | str:
    """The (model, row) a `tokenizer.tokens` entry names, or what is wrong with it."""
    if isinstance(source, TokenSource) and source.kind == "zero":
        return ()
    ref = source.model if isinstance(source, TokenSource) else source
    where = f"tokenizer.tokens[{token!r}]"
    m = model_index.get(ref or "")
    if m is None or m not in own:
        return f"{where}: model {ref!r} is not merged in this tensor"
    if isinstance(source, TokenSource):
        j = source.token_id if source.token_id is not None else vocabs[m].get(source.token or "")
        if j is None:
            return f"{where}: token {source.token!r} is not in the vocabulary of {ref!r}"
        if j >= rows[m]:
            return f"{where}: token id {j} is outside the {rows[m]} rows of {ref!r}"
        return ((m, j),)
    if own[m][r] < 0:
        return f"{where}: {ref!r} has no row for this token"
    return ((m, own[m][r]),)
