"""Extracting steering vectors from contrastive pairs, and choosing layers and strengths.

Hidden states are read at the last non-padding token of each text (or at given
positions), at the output of decoder block i (hooks on the blocks: the same place
`apply` and baking add to). `read="hidden_states"` reads transformers'
`output_hidden_states[i + 1]` instead, as repeng does: identical except at the last
layer, where transformers returns the final norm's output. Padded batches get explicit
position ids, so left padding does not shift absolute positions. Texts are encoded as
the model was trained (`weightops.prompting.encode_text`: with the BOS when the model
uses one, never chat-templated). Methods, per layer, with h⁺ and h⁻ the states of the positive and negative
texts of each pair:

- mean_diff: mean(h⁺) − mean(h⁻) (contrastive activation addition; keeps its scale).
- pca_diff: first principal component of the centred differences h⁺ − h⁻ (unit norm),
  as repeng computes it. Centring removes the shift that all pairs share, so this finds
  the axis along which the pairs' differences vary most; when the behaviour is one
  consistent shift, mean_diff recovers it and pca_diff may not (docs/steering.md).
- pca_center: first principal component of h⁺ and h⁻ centred on their pair's mean.
- probe: weights of an L2-regularised logistic regression separating h⁺ from h⁻,
  on standardised features, mapped back to the residual basis (unit norm).

PCA signs are arbitrary; each direction is turned so that the positive text of most
pairs projects higher than its negative (as repeng does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightops.prompting import encode_text, pad
from weightops.steering.layers import SteeringError, find_layers
from weightops.steering.vector import Pair, SteeringVector, _check_strength

METHODS = ("mean_diff", "pca_diff", "pca_center", "probe")
# Attention memory grows with the square of the length: a pasted book must be an
# error, not an attempt to allocate terabytes.
MAX_TOKENS = 4096


def _check_pairs(pairs: Sequence[Pair]) -> None:
    if not pairs:
        raise SteeringError("no contrastive pairs given")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise SteeringError(f"pair {i} is not a (positive, negative) pair of texts")
        if not all(isinstance(t, str) and t.strip() for t in pair):
            raise SteeringError(f"pair {i} has an empty or non-text side")


@torch.no_grad()
def hidden_states(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    positions: Sequence[int] | None = None,
    read: str = "block",
    layers_path: str | None = None,
) -> dict[int, torch.Tensor]:
    """{layer: [len(texts), hidden]} fp32 states at the last real token of each text
    (or at `positions[j]` of text j, counted in its own tokens; negative from the end)."""
    if read not in ("block", "hidden_states"):
        raise SteeringError(f"read must be 'block' or 'hidden_states' (got {read!r})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    blocks = find_layers(model, layers_path).blocks
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for b in range(0, len(texts), batch_size):
        batch = list(texts[b : b + batch_size])
        rows = [encode_text(tokenizer, t) for t in batch]
        ids, mask = pad(rows, tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right"))
        enc = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        mask = enc["attention_mask"]
        if mask.shape[1] > MAX_TOKENS:
            longest = b + int(mask.sum(-1).argmax())
            raise SteeringError(
                f"text {longest} is {int(mask.sum(-1).max())} tokens long, more than the "
                f"{MAX_TOKENS} a steering text may have",
                hint="contrastive texts are sentences or short passages; shorten it",
            )
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        if read == "hidden_states":
            hs = model(**enc, position_ids=position_ids, output_hidden_states=True).hidden_states
            states = {i: hs[i + 1] for i in layers}
        else:
            states = _block_outputs(model, blocks, layers, dict(enc, position_ids=position_ids))
        for j in range(len(batch)):
            real = mask[j].nonzero(as_tuple=True)[0]
            if positions is None:
                at = real[-1]
            else:
                p = positions[b + j]
                if not -len(real) <= p < len(real):
                    raise SteeringError(
                        f"position {p} is outside text {b + j} ({len(real)} tokens)"
                    )
                at = real[p]
            for i in layers:
                out[i].append(states[i][j, at].float().cpu())
    return {i: torch.stack(v) for i, v in out.items()}


def _block_outputs(
    model: torch.nn.Module,
    blocks: torch.nn.ModuleList,
    layers: Sequence[int],
    inputs: dict[str, Any],
) -> dict[int, torch.Tensor]:
    """Run the model once and keep the outputs of the chosen decoder blocks."""
    seen: dict[int, torch.Tensor] = {}

    def keep(i: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            seen[i] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [blocks[i].register_forward_hook(keep(i)) for i in layers]
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _first_pc(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    return vh[0].float()


def _probe(
    pos: torch.Tensor, neg: torch.Tensor, steps: int = 200, l2: float = 1e-3
) -> torch.Tensor:
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
            + l2 * w.square().sum()
        )
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    direction = (w.detach() / sd).float()  # the same decision function in the raw basis
    return direction / direction.norm().clamp_min(1e-12)


def direction(method: str, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """One layer's direction from paired states pos[k], neg[k]."""
    if method == "mean_diff":
        return pos.mean(0) - neg.mean(0)
    if method == "pca_diff":
        d = _first_pc(pos - neg)
    elif method == "pca_center":
        center = (pos + neg) / 2
        d = _first_pc(torch.cat([pos - center, neg - center]))
    elif method == "probe":
        return _probe(pos, neg)
    else:
        raise SteeringError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return orient(d, pos - neg)


def orient(d: torch.Tensor, diffs: torch.Tensor) -> torch.Tensor:
    """Turn d so that the positive text of most pairs projects higher. An even split
    goes to the sign of the mean projected difference, and an exact zero there to the
    sign of d's largest-magnitude entry, so the sign never depends on the SVD's."""
    proj = diffs.double() @ d.double()
    votes = int((proj > 0).sum()) - int((proj < 0).sum())
    if votes == 0:
        votes = int(torch.sign(proj.mean()))
    if votes == 0:
        votes = int(torch.sign(d[d.abs().argmax()]))
    return d if votes >= 0 else -d


def train(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[Pair],
    method: str = "pca_diff",
    layers: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
    positions: Sequence[tuple[int, int]] | None = None,
    layers_path: str | None = None,
    read: str = "block",
) -> SteeringVector:
    """A SteeringVector with one direction per layer (all layers by default)."""
    _check_pairs(pairs)
    if method not in METHODS:
        raise SteeringError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("pca_diff", "pca_center", "probe") and len(pairs) < 2:
        raise SteeringError(f"{method} needs at least 2 pairs (got {len(pairs)})")
    layout = find_layers(model, layers_path)
    depth = len(layout.blocks)
    layers = list(range(depth)) if layers is None else [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise SteeringError(
            f"layers {bad} are out of range: the model has {depth} (0 … {depth - 1})"
        )
    if positions is not None and len(positions) != len(pairs):
        raise SteeringError(f"{len(positions)} positions for {len(pairs)} pairs")
    texts = [t for p in pairs for t in p]
    flat_pos = None if positions is None else [q for p in positions for q in p]
    states = hidden_states(
        model,
        tokenizer,
        texts,
        layers,
        batch_size=batch_size,
        positions=flat_pos,
        read=read,
        layers_path=layers_path,
    )
    dirs = {i: direction(method, h[0::2], h[1::2]) for i, h in states.items()}
    return SteeringVector(
        dirs,
        model_type=layout.model_type,
        hidden_size=layout.hidden_size,
        layers_path=layout.path,
        method=method,
        read_at="last" if positions is None else "positions",
        info={"pairs": len(pairs)},
    )


@dataclass(frozen=True)
class LayerScore:
    layer: int
    accuracy: float  # share of held-out pairs whose positive projects above its negative
    margin: float  # mean held-out gap over the pooled spread of the projections


def search_layers(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[Pair],
    method: str = "mean_diff",
    *,
    folds: int = 5,
    seed: int = 0,
    layers_path: str | None = None,
) -> list[LayerScore]:
    """Contrastive layer search: rank layers by how well a direction learned on some
    pairs separates the others, by k-fold cross-validation (every pair is held out
    once, so the accuracy has 1/len(pairs) resolution instead of one small split's).
    Score: held-out pairwise accuracy, ties broken by a margin (mean projected gap over
    the pooled standard deviation of the fold's projections, averaged over pairs),
    best first."""
    _check_pairs(pairs)
    if len(pairs) < 4:
        raise SteeringError(f"layer search needs at least 4 pairs (got {len(pairs)})")
    if folds < 2:
        raise SteeringError(f"layer search needs at least 2 folds (got {folds})")
    layout = find_layers(model, layers_path)
    layers = list(range(len(layout.blocks)))
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    splits = [part for part in order.tensor_split(min(folds, len(pairs))) if len(part)]
    texts = [t for p in pairs for t in p]
    states = hidden_states(model, tokenizer, texts, layers, layers_path=layers_path)
    scores = []
    for i, h in states.items():
        pos, neg = h[0::2], h[1::2]
        right, gap = 0, 0.0
        for test in splits:
            fit = torch.ones(len(pairs), dtype=torch.bool)
            fit[test] = False
            d = direction(method, pos[fit], neg[fit])
            p, q = pos[test] @ d, neg[test] @ d
            spread = torch.cat([p, q]).std().clamp_min(1e-12) if len(test) > 1 else None
            if spread is None:
                spread = (pos[fit] @ d - neg[fit] @ d).std().clamp_min(1e-12)
            right += int((p > q).sum())
            gap += float(((p - q) / spread).sum())
        scores.append(LayerScore(i, right / len(pairs), gap / len(pairs)))
    return sorted(scores, key=lambda s: (s.accuracy, s.margin), reverse=True)


@dataclass(frozen=True)
class SweepPoint:
    strength: float
    target: float
    perplexity: float


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str]) -> float:
    """Token-weighted perplexity of `texts` (the helpfulness proxy of a sweep)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([encode_text(tokenizer, t)], device=device)
        if ids.shape[1] < 2:
            continue
        loss = model(ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    if count == 0:
        raise SteeringError("neutral texts are too short to measure perplexity")
    return float(torch.exp(torch.tensor(total / count)))


def sweep_strength(
    model: torch.nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    strengths: Sequence[float],
    target: Callable[[torch.nn.Module], float],
    neutral: Sequence[str],
) -> list[SweepPoint]:
    """For each strength: the user's target score of the steered model and its
    perplexity on neutral text, to pick a strength where the trade-off is good."""
    points = []
    for s in strengths:
        _check_strength(s)
        with vector.apply(model, strength=s):
            points.append(
                SweepPoint(s, float(target(model)), perplexity(model, tokenizer, neutral))
            )
    return points
