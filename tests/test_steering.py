"""Steering vectors: extraction, layer search, hooks, baking, values, files, bad input.

Every tiny model is built once for this module and only read by the tests (steering
must never modify it; several tests check exactly that). Reference values are computed
here independently: hidden states straight from `output_hidden_states`, principal
components with numpy's SVD, block outputs with our own forward hooks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from weightops.demo import tiny_model
from weightops.steering import SteeringError, SteeringVector, extract, find_layers, steer
from weightops.steering.bake import bake_ablation, bake_addition

HIDDEN = 64
DEPTH = 4

PAIRS = [
    ("I love this, it is great", "I hate this, it is awful"),
    ("happy day", "sad day!!"),
    ("Yes, gladly.", "No."),
    ("wonderful and kind", "terrible and mean"),
    ("good", "bad bad"),
    ("sunny warm morning", "cold dark night"),
    ("the best of all", "the worst"),
    ("smile", "frown and cry"),
]
OTHER_PAIRS = [
    ("Short.", "A much longer answer here"),
    ("tiny", "enormous and verbose"),
    ("ok", "well, let me explain"),
    ("brief", "long long long"),
]
PROMPTS = ["hello there, friend", "abc"]


# ---------------------------------------------------------------- fixtures


class _Zoo:
    """Tiny models built and loaded on first use, once per module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders: dict[str, Path] = {}
        self.loaded: dict[str, tuple[Any, Any]] = {}

    def folder(self, family: str) -> Path:
        if family not in self.folders:
            self.folders[family] = tiny_model(self.root / family, family, seed=0)
        return self.folders[family]

    def get(self, family: str) -> tuple[Any, Any]:
        if family not in self.loaded:
            self.loaded[family] = load(self.folder(family))
        return self.loaded[family]


def load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The models are tiny: one thread avoids thread-pool overhead on busy machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> _Zoo:
    return _Zoo(tmp_path_factory.mktemp("steering_models"))


@pytest.fixture(scope="module")
def llama(zoo: _Zoo) -> tuple[Any, Any]:
    return zoo.get("llama")


@pytest.fixture(scope="module")
def gpt2(zoo: _Zoo) -> tuple[Any, Any]:
    return zoo.get("gpt2")


@pytest.fixture(scope="module")
def llama_vec(llama: tuple[Any, Any]) -> SteeringVector:
    model, tok = llama
    return SteeringVector.train(model, tok, PAIRS, method="mean_diff")


# ---------------------------------------------------------------- helpers


@torch.no_grad()
def logits(model: Any, tok: Any, texts: list[str] = PROMPTS) -> torch.Tensor:
    enc = tok(texts, padding=True, return_tensors="pt")
    return model(**enc).logits


_STATES: dict[tuple[int, str, int], list[torch.Tensor]] = {}


def model_inputs(tok: Any, texts: Any, **kw: Any) -> dict[str, torch.Tensor]:
    """The tokenizer's encoding as weightops feeds it: ids and attention mask only (some
    transformers versions also return token_type_ids for a plain fast tokenizer, which
    GPT-2 would add as token-type embeddings)."""
    enc = tok(texts, return_tensors="pt", **kw)
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def own_states(model: Any, tok: Any, text: str, at: int = -1) -> list[torch.Tensor]:
    """[layer] output of decoder block i for one text run alone (no padding), read
    with our own forward hooks."""
    key = (id(model), text, at)
    if key not in _STATES:
        outs, _ = block_outputs(model, tok, [text])
        _STATES[key] = [h[0, at].double() for h in outs[1:]]
    return _STATES[key]


def paired_states(
    model: Any, tok: Any, pairs: list[tuple[str, str]], layer: int
) -> tuple[np.ndarray, np.ndarray]:
    pos = np.stack([own_states(model, tok, p)[layer].numpy() for p, _ in pairs])
    neg = np.stack([own_states(model, tok, n)[layer].numpy() for _, n in pairs])
    return pos, neg


@torch.no_grad()
def block_outputs(
    model: Any, tok: Any, texts: list[str]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The output of every decoder block (captured with our own hooks) and the logits."""
    blocks = find_layers(model).blocks
    got: dict[int, torch.Tensor] = {}
    handles = [
        b.register_forward_hook(
            lambda m, a, o, i=i: got.__setitem__(i, o[0] if isinstance(o, tuple) else o)
        )
        for i, b in enumerate(blocks)
    ]
    try:
        enc = model_inputs(tok, texts, padding=True)
        out = model(**enc, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return [out.hidden_states[0]] + [got[i] for i in range(len(blocks))], out.logits


def hook_snapshot(model: Any) -> dict[str, tuple]:
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks))
        for name, m in model.named_modules()
    }


def state_snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: Any, hooks: dict[str, tuple], state: dict[str, torch.Tensor]) -> None:
    assert hook_snapshot(model) == hooks
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def vec(
    dirs: dict[int, list[float] | torch.Tensor],
    model_type: str = "llama",
    hidden: int = 3,
    **kw: Any,
) -> SteeringVector:
    return SteeringVector(
        {i: torch.as_tensor(d, dtype=torch.float32) for i, d in dirs.items()},
        model_type=model_type,
        hidden_size=hidden,
        **kw,
    )


def unit(n: int, seed: int) -> torch.Tensor:
    d = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize("method", extract.METHODS)
def test_each_method_gives_one_direction_per_layer(llama: tuple[Any, Any], method: str) -> None:
    model, tok = llama
    v = SteeringVector.train(model, tok, PAIRS, method=method)
    assert v.layers == list(range(DEPTH))
    assert (v.model_type, v.hidden_size, v.method, v.layers_path) == (
        "llama",
        HIDDEN,
        method,
        "model.layers",
    )
    for d in v.directions.values():
        assert d.shape == (HIDDEN,) and d.dtype == torch.float32
        assert torch.isfinite(d).all() and d.norm() > 0
        if method != "mean_diff":
            assert d.norm().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mean_diff_equals_independent_computation(zoo: _Zoo, family: str) -> None:
    model, tok = zoo.get(family)
    v = SteeringVector.train(model, tok, PAIRS, method="mean_diff")
    for i in range(DEPTH):
        pos, neg = paired_states(model, tok, PAIRS, i)
        want = pos.mean(0) - neg.mean(0)
        np.testing.assert_allclose(v.directions[i].numpy(), want, atol=1e-5, rtol=1e-5)
    # Below the last layer the block output is transformers' hidden_states[i + 1].
    with torch.no_grad():
        hs = {
            t: model(**model_inputs(tok, t), output_hidden_states=True).hidden_states
            for pair in PAIRS
            for t in pair
        }
    for i in range(DEPTH - 1):
        want = torch.stack([hs[p][i + 1][0, -1] for p, _ in PAIRS]).double().mean(0) - torch.stack(
            [hs[n][i + 1][0, -1] for _, n in PAIRS]
        ).double().mean(0)
        np.testing.assert_allclose(v.directions[i].numpy(), want.numpy(), atol=1e-5, rtol=1e-5)


def test_read_hidden_states_takes_the_final_norm_at_the_last_layer(
    llama: tuple[Any, Any], llama_vec: SteeringVector
) -> None:
    model, tok = llama
    v = SteeringVector.train(model, tok, PAIRS, method="mean_diff", read="hidden_states")
    with torch.no_grad():
        last = {
            t: model(**model_inputs(tok, t), output_hidden_states=True).hidden_states[-1][0, -1]
            for pair in PAIRS
            for t in pair
        }
    want = torch.stack([last[p] for p, _ in PAIRS]).mean(0) - torch.stack(
        [last[n] for _, n in PAIRS]
    ).mean(0)
    torch.testing.assert_close(v.directions[DEPTH - 1], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v.directions[DEPTH - 1], llama_vec.directions[DEPTH - 1], atol=1e-3)
    for i in range(DEPTH - 1):
        torch.testing.assert_close(v.directions[i], llama_vec.directions[i], atol=1e-6, rtol=0)
    with pytest.raises(SteeringError, match="read"):
        SteeringVector.train(model, tok, PAIRS, method="mean_diff", read="attention")


def _svd_first(x: np.ndarray) -> np.ndarray:
    return np.linalg.svd(x, full_matrices=False)[2][0]


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_pca_methods_equal_numpy_svd_up_to_sign(llama: tuple[Any, Any], method: str) -> None:
    model, tok = llama
    v = SteeringVector.train(model, tok, PAIRS, method=method)
    for i in range(DEPTH):
        pos, neg = paired_states(model, tok, PAIRS, i)
        if method == "pca_diff":
            diff = pos - neg
            want = _svd_first(diff - diff.mean(0))
        else:
            center = (pos + neg) / 2
            want = _svd_first(np.concatenate([pos - center, neg - center]))
        got = v.directions[i].double().numpy()
        sign = np.sign(got @ want)
        np.testing.assert_allclose(got, sign * want, atol=1e-4)
        # Oriented so that the positive text of most pairs projects higher.
        assert ((pos - neg) @ got > 0).mean() >= 0.5


def test_pca_sign_follows_the_majority_of_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    u = unit(16, 1)
    # Six pairs with the positive above by a little, two far below: the principal axis
    # is ±u; the majority decides the sign, not the size of the gaps.
    gaps = torch.tensor([1.0, 1.2, 0.9, 1.1, 1.0, 0.8, -5.0, -6.0])
    neg = torch.randn(8, 16, generator=g)
    pos = neg + gaps[:, None] * u + 0.01 * torch.randn(8, 16, generator=g)
    for method in ("pca_diff", "pca_center"):
        d = extract.direction(method, pos, neg)
        assert abs(float(d @ u)) > 0.99
        assert float(d @ u) > 0, method
        assert float(extract.direction(method, neg, pos) @ u) < 0, method


def test_probe_separates_linearly_separable_toy_data() -> None:
    g = torch.Generator().manual_seed(3)
    u = unit(32, 4)
    pos = torch.randn(20, 32, generator=g) + 3 * u
    neg = torch.randn(20, 32, generator=g) - 3 * u
    d = extract.direction("probe", pos, neg)
    assert d.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert (pos @ d).min() > (neg @ d).max()  # one threshold classifies all: accuracy 1
    assert float(d @ u) > 0.5


def test_probe_separates_its_training_pairs(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    v = SteeringVector.train(model, tok, PAIRS, method="probe")
    for i in range(DEPTH):
        pos, neg = paired_states(model, tok, PAIRS, i)
        d = v.directions[i].double().numpy()
        assert (pos @ d).min() > (neg @ d).max(), f"layer {i}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["mean_diff", "pca_diff"])
def test_padding_does_not_change_the_vector(zoo: _Zoo, family: str, method: str) -> None:
    model, tok = zoo.get(family)
    one = SteeringVector.train(model, tok, PAIRS, method=method, batch_size=1)
    many = SteeringVector.train(model, tok, PAIRS, method=method, batch_size=16)
    odd = SteeringVector.train(model, tok, PAIRS, method=method, batch_size=3)
    for i in range(DEPTH):
        torch.testing.assert_close(one.directions[i], many.directions[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(one.directions[i], odd.directions[i], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padding_does_not_change_the_vector(zoo: _Zoo, family: str) -> None:
    model, tok = zoo.get(family)
    one = SteeringVector.train(model, tok, PAIRS, method="mean_diff", batch_size=1)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        many = SteeringVector.train(model, tok, PAIRS, method="mean_diff", batch_size=16)
    finally:
        tok.padding_side = side
    for i in range(DEPTH):
        torch.testing.assert_close(one.directions[i], many.directions[i], atol=1e-4, rtol=0)


def test_last_layer_is_read_at_the_block_output(
    llama: tuple[Any, Any], llama_vec: SteeringVector
) -> None:
    """Layer i is where `apply` adds: the output of block i, not the final norm's."""
    model, tok = llama
    pos = torch.stack([block_outputs(model, tok, [p])[0][DEPTH][0, -1] for p, _ in PAIRS])
    neg = torch.stack([block_outputs(model, tok, [n])[0][DEPTH][0, -1] for _, n in PAIRS])
    torch.testing.assert_close(
        llama_vec.directions[DEPTH - 1], pos.mean(0) - neg.mean(0), atol=1e-5, rtol=1e-5
    )


def test_layers_argument_restricts(llama: tuple[Any, Any], llama_vec: SteeringVector) -> None:
    model, tok = llama
    v = SteeringVector.train(model, tok, PAIRS, method="mean_diff", layers=[3, 1])
    assert v.layers == [1, 3]
    for i in (1, 3):
        torch.testing.assert_close(v.directions[i], llama_vec.directions[i], atol=1e-6, rtol=0)


def test_positions_argument(llama: tuple[Any, Any], llama_vec: SteeringVector) -> None:
    model, tok = llama
    pairs = PAIRS[:4]
    first = SteeringVector.train(model, tok, pairs, method="mean_diff", positions=[(0, 1)] * 4)
    assert first.read_at == "positions"
    for i in range(DEPTH):
        pos = torch.stack([own_states(model, tok, p, at=0)[i] for p, _ in pairs])
        neg = torch.stack([own_states(model, tok, n, at=1)[i] for _, n in pairs])
        torch.testing.assert_close(
            first.directions[i].double(), pos.mean(0) - neg.mean(0), atol=1e-5, rtol=1e-5
        )
    # Position -1 of each text is its last real token: the default.
    last = SteeringVector.train(
        model, tok, PAIRS, method="mean_diff", positions=[(-1, -1)] * len(PAIRS)
    )
    default = SteeringVector.train(model, tok, PAIRS, method="mean_diff")
    for i in range(DEPTH):
        torch.testing.assert_close(last.directions[i], default.directions[i], atol=1e-6, rtol=0)
    with pytest.raises(SteeringError, match="position"):
        SteeringVector.train(model, tok, pairs, method="mean_diff", positions=[(0, 50)] * 4)
    with pytest.raises(SteeringError, match="positions"):
        SteeringVector.train(model, tok, pairs, method="mean_diff", positions=[(0, 0)] * 3)


# ---------------------------------------------------------------- layer search


def test_search_layers_is_well_formed_and_deterministic(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    scores = extract.search_layers(model, tok, PAIRS, seed=1)
    assert sorted(s.layer for s in scores) == list(range(DEPTH))
    keys = [(s.accuracy, s.margin) for s in scores]
    assert keys == sorted(keys, reverse=True)
    n = len(PAIRS)  # cross-validation holds every pair out once
    for s in scores:
        assert 0.0 <= s.accuracy <= 1.0 and math.isfinite(s.margin)
        assert (s.accuracy * n) == pytest.approx(round(s.accuracy * n))
    assert extract.search_layers(model, tok, PAIRS, seed=1) == scores
    with pytest.raises(SteeringError, match="4 pairs"):
        extract.search_layers(model, tok, PAIRS[:3])


def test_orientation_rule_is_deterministic_on_ties() -> None:
    d = torch.tensor([0.6, -0.8])
    # Two pairs project up, two down: the mean projected difference decides (+0.1 > 0).
    diffs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-0.5, 0.0], [-1.0 - 1 / 6, 0.0]])
    assert (diffs @ d).mean() > 0
    assert torch.equal(extract.orient(d, diffs), d)
    assert torch.equal(extract.orient(-d, diffs), d)
    # A perfectly balanced split: the largest entry of the direction turns positive.
    balanced = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert torch.equal(extract.orient(d, balanced), -d)
    assert torch.equal(extract.orient(-d, balanced), -d)
    # A clear majority wins whatever the mean says.
    skew = torch.tensor([[0.1, 0.0], [0.1, 0.0], [-9.0, 0.0]])
    assert torch.equal(extract.orient(d, skew), d)


def test_search_layers_ranks_by_every_pair_held_out(
    llama: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layer 1 separates all pairs, layer 3 all but one: a single 25 % split would often
    tie them at 1.0; cross-validation tells them apart."""
    model, tok = llama
    n = len(PAIRS)
    g = torch.Generator().manual_seed(2)
    u = unit(HIDDEN, 3)

    def fake(model: Any, tokenizer: Any, texts: list[str], layers: list[int], **kw: Any):
        out = {i: torch.randn(2 * n, HIDDEN, generator=g) * 0.01 for i in layers}
        out[1][0::2] += 5 * u
        out[3][0::2] += 5 * u
        out[3][1] += 10 * u  # pair 0: its negative lies beyond the positives along u
        return out

    monkeypatch.setattr(extract, "hidden_states", fake)
    scores = {s.layer: s for s in extract.search_layers(model, tok, PAIRS, method="mean_diff")}
    assert scores[1].accuracy == 1.0
    assert scores[3].accuracy == (n - 1) / n
    ranked = extract.search_layers(model, tok, PAIRS, method="mean_diff")
    assert ranked[0].layer == 1


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff"])
def test_search_layers_finds_a_planted_signal(
    llama: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    model, tok = llama
    n = len(PAIRS)
    g = torch.Generator().manual_seed(5)
    u = unit(HIDDEN, 6)

    def fake(
        model: Any, tokenizer: Any, texts: list[str], layers: list[int], **kw: Any
    ) -> dict[int, torch.Tensor]:
        assert len(texts) == 2 * n
        out = {i: torch.randn(2 * n, HIDDEN, generator=g) for i in layers}
        # Positives far along u at layer 2 only, by varying amounts (pca_diff centres
        # the differences, so a constant offset alone would leave it no signal).
        gaps = torch.linspace(5, 40, n)
        out[2][0::2] += gaps[:, None] * u
        return out

    monkeypatch.setattr(extract, "hidden_states", fake)
    scores = extract.search_layers(model, tok, PAIRS, method=method, folds=2)
    assert scores[0].layer == 2
    assert scores[0].accuracy == 1.0 and scores[0].margin > 1.0


def test_perplexity_and_strength_sweep(llama: tuple[Any, Any], llama_vec: SteeringVector) -> None:
    model, tok = llama
    neutral = ["a plain sentence", "another one here"]
    base = extract.perplexity(model, tok, neutral)
    assert math.isfinite(base) and base > 1.0
    probe = tok(PROMPTS[:1], return_tensors="pt")
    ref = model(**probe).logits.detach()

    def target(m: Any) -> float:
        with torch.no_grad():
            return float((m(**probe).logits - ref).abs().max())

    points = extract.sweep_strength(model, tok, llama_vec, [0.0, 4.0], target, neutral)
    assert [p.strength for p in points] == [0.0, 4.0]
    assert points[0].target == 0.0 and points[0].perplexity == pytest.approx(base, rel=1e-6)
    assert points[1].target > 0.0 and points[1].perplexity != pytest.approx(base, rel=1e-6)
    with pytest.raises(SteeringError):
        extract.sweep_strength(model, tok, llama_vec, [float("nan")], target, neutral)
    with pytest.raises(SteeringError, match="too short"):
        extract.perplexity(model, tok, ["a"])


# ---------------------------------------------------------------- runtime hooks

FAMILIES = ["llama", "qwen2", "gemma", "gpt2"]


@pytest.fixture(scope="module")
def vectors(zoo: _Zoo) -> dict[str, SteeringVector]:
    out = {}
    for family in FAMILIES:
        model, tok = zoo.get(family)
        out[family] = SteeringVector.train(model, tok, PAIRS, method="mean_diff")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_changes_logits_and_leaves_the_model_as_it_was(
    zoo: _Zoo, vectors: dict[str, SteeringVector], family: str
) -> None:
    model, tok = zoo.get(family)
    hooks, state = hook_snapshot(model), state_snapshot(model)
    before = logits(model, tok)
    with vectors[family].apply(model, strength=4.0) as m:
        assert m is model
        assert hook_snapshot(model) != hooks
        inside = logits(model, tok)
    after = logits(model, tok)
    assert not torch.allclose(inside, before, atol=1e-3)
    assert torch.equal(after, before)
    assert_untouched(model, hooks, state)


def test_hooks_are_removed_when_the_block_raises(
    llama: tuple[Any, Any], llama_vec: SteeringVector
) -> None:
    model, tok = llama
    hooks, state = hook_snapshot(model), state_snapshot(model)
    before = logits(model, tok)
    for kwargs in (
        {"strength": 3.0},
        {"strength": 3.0, "start": 2},
        {"mode": "ablate", "layer": 1},
    ):
        with pytest.raises(RuntimeError, match="boom"), llama_vec.apply(model, **kwargs):
            logits(model, tok)
            raise RuntimeError("boom")
        assert_untouched(model, hooks, state)
    assert torch.equal(logits(model, tok), before)


def test_refused_apply_leaves_no_hooks(llama: tuple[Any, Any], llama_vec: SteeringVector) -> None:
    model, _ = llama
    hooks = hook_snapshot(model)
    with pytest.raises(SteeringError), steer(model, [(llama_vec, 1.0), (llama_vec, float("inf"))]):
        pass
    with (
        pytest.raises(SteeringError),
        llama_vec.apply(model, mode="ablate"),
    ):  # four layers: ablation needs layer=
        pass
    assert hook_snapshot(model) == hooks


def test_strength_zero_gives_identical_logits(
    llama: tuple[Any, Any], llama_vec: SteeringVector
) -> None:
    model, tok = llama
    before = logits(model, tok)
    with llama_vec.apply(model, strength=0.0):
        assert torch.equal(logits(model, tok), before)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 2, DEPTH - 1])
def test_addition_at_block_i_shifts_its_output_by_s_d(zoo: _Zoo, family: str, layer: int) -> None:
    model, tok = zoo.get(family)
    d = unit(HIDDEN, layer + 10)
    v = vec({layer: d}, model_type=family, hidden=HIDDEN)
    s = 2.5
    plain, _ = block_outputs(model, tok, PROMPTS)
    with v.apply(model, strength=s):
        steered, _ = block_outputs(model, tok, PROMPTS)
    for j in range(layer + 1):  # embeddings and earlier blocks: untouched
        assert torch.equal(steered[j], plain[j])
    torch.testing.assert_close(
        steered[layer + 1] - plain[layer + 1],
        (s * d).expand_as(plain[layer + 1]),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_output_hidden_states_show_the_addition(zoo: _Zoo, family: str) -> None:
    model, tok = zoo.get(family)
    layer, s = 1, 2.5
    d = unit(HIDDEN, 11)
    v = vec({layer: d}, model_type=family, hidden=HIDDEN)
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model(**enc, output_hidden_states=True).hidden_states
        with v.apply(model, strength=s):
            b = model(**enc, output_hidden_states=True).hidden_states
    assert torch.equal(a[layer], b[layer])
    torch.testing.assert_close(
        b[layer + 1] - a[layer + 1], (s * d).expand_as(a[layer + 1]), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_start_leaves_earlier_positions_untouched(
    zoo: _Zoo, vectors: dict[str, SteeringVector], family: str
) -> None:
    model, tok = zoo.get(family)
    text = ["a steady sentence to steer"]
    before = logits(model, tok, text)
    k = 5
    with vectors[family].apply(model, strength=4.0, start=k):
        steered = logits(model, tok, text)
    torch.testing.assert_close(steered[:, :k], before[:, :k], atol=1e-6, rtol=0)
    assert not torch.allclose(steered[:, k:], before[:, k:], atol=1e-3)
    assert (steered[:, k:] - before[:, k:]).abs().amax(-1).min() > 1e-4  # every later position


@torch.no_grad()
def greedy_without_cache(model: Any, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding that recomputes every position at every step (no KV cache), with
    the positions `generate` gives left-padded rows."""
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_cache_and_start(
    zoo: _Zoo, vectors: dict[str, SteeringVector], family: str
) -> None:
    """Cached generation equals recomputing everything, for `start` before the prompt
    (in the left padding of the shorter row), inside it, at its end and after it."""
    model, tok = zoo.get(family)
    tok.padding_side = "left"
    enc = tok(["hello there, my good friend", "hi"], return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask
    n = ids.shape[1]
    pad = int((mask[1] == 0).sum())
    assert pad >= 2  # the second row starts inside the padding
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    v = vectors[family]
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, **kw)
    for start in (1, pad, n - 2, n, n + 2):
        with v.apply(model, strength=8.0, start=start), torch.no_grad():
            cached = model.generate(ids, attention_mask=mask, **kw)
            reference = greedy_without_cache(model, ids, mask, 5)
        assert torch.equal(cached, reference), start
        assert not torch.equal(cached, plain), start
        if start >= n:
            # The first generated token still comes from unsteered states.
            assert torch.equal(cached[:, n], plain[:, n]), start


def test_two_vectors_at_once_equal_their_sum(
    llama: tuple[Any, Any], llama_vec: SteeringVector
) -> None:
    model, tok = llama
    other = SteeringVector.train(model, tok, OTHER_PAIRS, method="pca_diff", layers=[1, 2])
    with steer(model, [(llama_vec, 2.0), (other, -1.5)]):
        both = logits(model, tok)
    with (2.0 * llama_vec - 1.5 * other).apply(model, strength=1.0):
        summed = logits(model, tok)
    with (llama_vec + other * -0.75).apply(model, strength=2.0):
        scaled = logits(model, tok)
    torch.testing.assert_close(both, summed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both, scaled, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both, logits(model, tok), atol=1e-3)


def _assert_no_component(states: list[torch.Tensor], r: torch.Tensor) -> None:
    r = r / r.norm()
    for j, h in enumerate(states):
        along = (h.double() @ r.double()).abs()
        assert (along <= 1e-4 * h.double().norm(dim=-1)).all(), f"state {j}: {along.max()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_removes_the_direction_everywhere(
    zoo: _Zoo, vectors: dict[str, SteeringVector], family: str
) -> None:
    model, tok = zoo.get(family)
    v = vectors[family]
    hooks, state = hook_snapshot(model), state_snapshot(model)
    plain_states, plain = block_outputs(model, tok, PROMPTS)
    r = v.directions[1]
    assert (
        max(float((h @ (r / r.norm())).abs().max()) for h in plain_states) > 1e-2
    )  # there is something to remove
    with v.select([1]).apply(model, mode="ablate"):
        single, single_logits = block_outputs(model, tok, PROMPTS)
    with v.apply(model, mode="ablate", layer=1, strength=123.0):
        chosen, chosen_logits = block_outputs(model, tok, PROMPTS)
    _assert_no_component(single, r)
    _assert_no_component(chosen, r)
    torch.testing.assert_close(single_logits, chosen_logits, atol=1e-6, rtol=0)
    assert not torch.allclose(single_logits, plain, atol=1e-4)
    assert_untouched(model, hooks, state)


def test_ablating_two_directions(llama: tuple[Any, Any], llama_vec: SteeringVector) -> None:
    model, tok = llama
    a, b = llama_vec.select([1]), llama_vec.select([2]).normalized()
    with steer(model, [(a, 1.0), (b, 1.0)], mode="ablate"):
        states, _ = block_outputs(model, tok, PROMPTS)
    _assert_no_component(states, a.directions[1])
    _assert_no_component(states, b.directions[2])
    with (
        pytest.raises(SteeringError, match="zero or repeats"),
        steer(model, [(a, 1.0), (a * 0.0, 1.0)], mode="ablate"),
    ):
        pass


@pytest.mark.parametrize("scale", [1.0, 3.0, -0.5])
def test_ablating_a_repeated_direction_is_refused(llama_vec: SteeringVector, scale: float) -> None:
    from weightops.steering.hooks import ablation_basis

    a = llama_vec.select([1])
    with pytest.raises(SteeringError, match="zero or repeats"):
        ablation_basis([(a, 1.0), (a * scale, 1.0)], None)


# ---------------------------------------------------------------- baking


def _check_card(folder: Path) -> None:
    assert (folder / "README.md").is_file()
    assert (folder / "config.json").is_file()
    assert list(folder.glob("*.safetensors"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bake_addition_matches_the_hooked_model(
    zoo: _Zoo, vectors: dict[str, SteeringVector], family: str, tmp_path: Path
) -> None:
    model, tok = zoo.get(family)
    v, s = vectors[family], 3.0
    with v.apply(model, strength=s):
        want = logits(model, tok)
    out = bake_addition(zoo.folder(family), v, s, tmp_path / "baked")
    _check_card(out)
    baked, _ = load(out)
    got = logits(baked, tok)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, logits(model, tok), atol=1e-3)
    if family == "llama":
        assert baked.config.mlp_bias is True


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bake_addition_of_strength_zero_equals_the_source(
    zoo: _Zoo, vectors: dict[str, SteeringVector], family: str, tmp_path: Path
) -> None:
    model, tok = zoo.get(family)
    out = bake_addition(zoo.folder(family), vectors[family], 0.0, tmp_path / "zero")
    baked, _ = load(out)
    torch.testing.assert_close(logits(baked, tok), logits(model, tok), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_bake_ablation_matches_the_hooked_model(
    zoo: _Zoo, vectors: dict[str, SteeringVector], family: str, tmp_path: Path
) -> None:
    model, tok = zoo.get(family)
    v = vectors[family]
    with v.apply(model, mode="ablate", layer=2):
        want = logits(model, tok)
    out = bake_ablation(zoo.folder(family), v, tmp_path / "ablated", layer=2)
    _check_card(out)
    baked, _ = load(out)
    got = logits(baked, tok)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, logits(model, tok), atol=1e-3)
    # The same through a single-direction vector, without layer=.
    single = bake_ablation(zoo.folder(family), v.select([2]), tmp_path / "single")
    torch.testing.assert_close(logits(load(single)[0], tok), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_bake_addition_is_refused_without_an_mlp_bias(
    zoo: _Zoo, vectors: dict[str, SteeringVector], family: str, tmp_path: Path
) -> None:
    with pytest.raises(SteeringError, match=f"{family}.*bias") as err:
        bake_addition(zoo.folder(family), vectors[family], 1.0, tmp_path / "out")
    assert "hooks" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bake_refuses_bad_vectors_and_strengths(
    zoo: _Zoo, vectors: dict[str, SteeringVector], tmp_path: Path
) -> None:
    src = zoo.folder("llama")
    v = vectors["llama"]
    with pytest.raises(SteeringError, match="finite"):
        bake_addition(src, v, float("nan"), tmp_path / "a")
    with pytest.raises(SteeringError, match="gpt2"):
        bake_addition(src, vectors["gpt2"], 1.0, tmp_path / "b")
    with pytest.raises(SteeringError, match="hidden size"):
        bake_ablation(src, vec({1: [1.0, 0.0, 0.0]}), tmp_path / "c")
    with pytest.raises(SteeringError, match="99"):
        bake_addition(src, vec({99: unit(HIDDEN, 0)}, hidden=HIDDEN), 1.0, tmp_path / "d")
    with pytest.raises(SteeringError, match="layer"):
        bake_ablation(src, v, tmp_path / "e")  # four directions and no layer=
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- values


def test_arithmetic_combines_layer_by_layer() -> None:
    a = vec({0: [1.0, 2.0, 3.0], 1: [0.0, 1.0, 0.0]}, method="mean_diff", info={"pairs": 3})
    b = vec({1: [1.0, 1.0, 1.0], 2: [2.0, 0.0, 0.0]})
    total = a + b
    assert total.layers == [0, 1, 2] and total.method == "combined"
    assert total.directions[0].tolist() == [
        1.0,
        2.0,
        3.0,
    ]  # a layer missing on one side counts as zero
    assert total.directions[1].tolist() == [1.0, 2.0, 1.0]
    assert total.directions[2].tolist() == [2.0, 0.0, 0.0]
    diff = a - b
    assert diff.directions[1].tolist() == [-1.0, 0.0, -1.0]
    assert diff.directions[2].tolist() == [-2.0, 0.0, 0.0]
    for scaled in (a * 2, 2 * a, 2.0 * a, a / 0.5):
        assert scaled.directions[0].tolist() == [2.0, 4.0, 6.0]
        assert (scaled.model_type, scaled.hidden_size, scaled.method, scaled.info) == (
            "llama",
            3,
            "mean_diff",
            {"pairs": 3},
        )
    assert (-a).directions[0].tolist() == [-1.0, -2.0, -3.0]
    # Values: the operands are unchanged.
    assert a.directions[0].tolist() == [1.0, 2.0, 3.0] and b.layers == [1, 2]
    with pytest.raises(TypeError):
        a * a
    with pytest.raises(TypeError):
        a + 1.0


def test_normalized_and_select() -> None:
    a = vec({0: [3.0, 4.0, 0.0], 2: [0.0, 0.0, 0.0], 5: [0.0, -2.0, 0.0]})
    n = a.normalized()
    assert n.directions[0].tolist() == pytest.approx([0.6, 0.8, 0.0])
    assert n.directions[2].tolist() == [0.0, 0.0, 0.0]
    assert n.directions[5].tolist() == [0.0, -1.0, 0.0]
    assert a.directions[0].tolist() == [3.0, 4.0, 0.0]
    s = a.select([5, 0])
    assert s.layers == [0, 5] and s.directions[5].tolist() == [0.0, -2.0, 0.0]
    with pytest.raises(SteeringError, match=r"\[3\]"):
        a.select([0, 3])


def test_incompatible_vectors_do_not_combine() -> None:
    a = vec({0: [1.0, 0.0, 0.0]})
    with pytest.raises(SteeringError, match="hidden"):
        a + vec({0: [1.0, 0.0, 0.0, 0.0]}, hidden=4)
    with pytest.raises(SteeringError, match="gpt2"):
        a - vec({0: [1.0, 0.0, 0.0]}, model_type="gpt2")
    with pytest.raises(SteeringError, match="shape"):
        vec({0: [1.0, 0.0]})
    with pytest.raises(SteeringError, match="shape"):
        SteeringVector({0: torch.zeros(1, 3)}, model_type="llama", hidden_size=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scales_are_refused(bad: float) -> None:
    a = vec({0: [1.0, 0.0, 0.0]})
    with pytest.raises(SteeringError, match="finite"):
        a * bad
    with pytest.raises(SteeringError, match="finite"):
        bad * a


def test_save_load_round_trip(tmp_path: Path, llama_vec: SteeringVector) -> None:
    v = SteeringVector(
        dict(llama_vec.directions),
        model_type="llama",
        hidden_size=HIDDEN,
        layers_path="model.layers",
        method="pca_diff",
        read_at="positions",
        info={"pairs": 8, "note": "é"},
    )
    path = v.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(path)
    assert back.layers == v.layers
    for i in v.layers:
        assert torch.equal(back.directions[i], v.directions[i])
    assert (
        back.model_type,
        back.hidden_size,
        back.layers_path,
        back.method,
        back.read_at,
        back.info,
    ) == ("llama", HIDDEN, "model.layers", "pca_diff", "positions", {"pairs": 8, "note": "é"})
    # Readable by the safetensors library, as direction.N tensors.
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == [f"direction.{i}" for i in v.layers]
        assert f.metadata()["model_type"] == "llama"


def test_load_refuses_other_safetensors_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"direction.1": torch.zeros(3)}, plain)
    with pytest.raises(SteeringError, match="steering"):
        SteeringVector.load(plain)
    other = tmp_path / "other.safetensors"
    save_file({"model.embed.weight": torch.zeros(2, 3)}, other, metadata={"format": "pt"})
    with pytest.raises(SteeringError, match="steering"):
        SteeringVector.load(other)
    odd = tmp_path / "odd.safetensors"
    save_file(
        {"weights": torch.zeros(3)},
        odd,
        metadata={"format": "weightops-steering", "hidden_size": "3"},
    )
    with pytest.raises(SteeringError, match=r"direction\.N"):
        SteeringVector.load(odd)


def test_gguf_round_trip_and_independent_read(tmp_path: Path, llama_vec: SteeringVector) -> None:
    import gguf

    v = llama_vec.select([1, 2, 3])
    path = v.export_gguf(tmp_path / "v.gguf")
    reader = gguf.GGUFReader(str(path))

    def text(key: str) -> str:
        f = reader.get_field(key)
        assert f is not None, key
        return bytes(f.parts[f.data[0]]).decode()

    assert text("general.architecture") == "controlvector"
    assert text("controlvector.model_hint") == "llama"
    count = reader.get_field("controlvector.layer_count")
    assert int(count.parts[count.data[0]][0]) == 3
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.3"]
    for i in (1, 2, 3):
        t = tensors[f"direction.{i}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(
            np.asarray(t.data, dtype=np.float32).reshape(-1), v.directions[i].numpy()
        )
    for back in (SteeringVector.import_gguf(path), SteeringVector.load(path)):
        assert back.layers == [1, 2, 3] and (back.model_type, back.hidden_size) == ("llama", HIDDEN)
        for i in (1, 2, 3):
            assert torch.equal(back.directions[i], v.directions[i])


def test_gguf_refusals(tmp_path: Path, llama_vec: SteeringVector) -> None:
    import gguf

    with pytest.raises(SteeringError, match="layer 0"):
        llama_vec.export_gguf(tmp_path / "zero.gguf")
    assert not (tmp_path / "zero.gguf").exists()
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("direction.1", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SteeringError, match="controlvector"):
        SteeringVector.load(path)


# ---------------------------------------------------------------- bad input


def test_vectors_that_do_not_fit_the_model_are_refused(
    llama: tuple[Any, Any], gpt2: tuple[Any, Any], vectors: dict[str, SteeringVector]
) -> None:
    model, _ = llama
    hooks = hook_snapshot(model)
    cases = [
        (vectors["gpt2"], None),  # same hidden size, other model type (message: see below)
        (vec({1: unit(32, 0)}, hidden=32), "hidden size"),
        (vec({99: unit(HIDDEN, 0)}, hidden=HIDDEN), "99"),
    ]
    for v, msg in cases:
        for kwargs in ({}, {"mode": "ablate", "layer": 99 if msg == "99" else 1}):
            with pytest.raises(SteeringError, match=msg), v.apply(model, **kwargs):
                pass
    with pytest.raises(SteeringError), vectors["llama"].apply(gpt2[0]):
        pass
    assert hook_snapshot(model) == hooks


@pytest.mark.parametrize("source, target", [("gpt2", "llama"), ("llama", "gpt2")])
def test_a_vector_from_another_family_is_named_in_the_error(
    zoo: _Zoo, vectors: dict[str, SteeringVector], source: str, target: str
) -> None:
    with (
        pytest.raises(SteeringError, match=rf"{source}.*{target}|{target}.*{source}"),
        vectors[source].apply(zoo.get(target)[0]),
    ):
        pass


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"strength": float("nan")}, "finite"),
        ({"strength": float("inf")}, "finite"),
        ({"mode": "subtract"}, "mode"),
        ({"start": -1}, "start"),
        ({"mode": "ablate", "layer": 7}, "layer 7"),
    ],
)
def test_bad_apply_arguments(
    llama: tuple[Any, Any], llama_vec: SteeringVector, kwargs: dict, msg: str
) -> None:
    model, _ = llama
    hooks = hook_snapshot(model)
    with pytest.raises(SteeringError, match=msg), llama_vec.apply(model, **kwargs):
        pass
    with pytest.raises(SteeringError), steer(model, []):
        pass
    assert hook_snapshot(model) == hooks


@pytest.mark.parametrize(
    "pairs, msg",
    [
        ([], "no contrastive pairs"),
        ([("good", "")], "empty"),
        ([("good", "   ")], "empty"),
        ([("good", None)], "empty"),
        (["good"], "not a"),
        ([("a", "b", "c")], "not a"),
        ("ab", "not a"),
    ],
)
def test_bad_pairs_are_refused(llama: tuple[Any, Any], pairs: Any, msg: str) -> None:
    model, tok = llama
    with pytest.raises(SteeringError, match=msg):
        SteeringVector.train(model, tok, pairs, method="mean_diff")


def test_bad_train_arguments(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    with pytest.raises(SteeringError, match="99"):
        SteeringVector.train(model, tok, PAIRS, layers=[99])
    with pytest.raises(SteeringError, match="-1"):
        SteeringVector.train(model, tok, PAIRS, layers=[-1])
    with pytest.raises(SteeringError, match="unknown method"):
        SteeringVector.train(model, tok, PAIRS, method="median_diff")
    with pytest.raises(SteeringError, match="unknown method"):
        extract.direction("median_diff", torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(SteeringError, match="at least 2"):
        SteeringVector.train(model, tok, PAIRS[:1], method="pca_diff")
    with pytest.raises(SteeringError, match="ModuleList"):
        SteeringVector.train(model, tok, PAIRS, layers_path="lm_head")
