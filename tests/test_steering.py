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
from weightops.steering import SteeringError, SteeringVector, find_layers, steer
from weightops.steering import extract
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


@torch.no_grad()
def own_states(model: Any, tok: Any, text: str, at: int = -1) -> list[torch.Tensor]:
    """[layer] state of one text, run alone (no padding): hidden_states[i + 1]."""
    enc = tok(text, return_tensors="pt")
    hs = model(**enc, output_hidden_states=True).hidden_states
    return [hs[i + 1][0, at].double() for i in range(len(hs) - 1)]


def paired_states(model: Any, tok: Any, pairs: list[tuple[str, str]], layer: int) -> tuple[np.ndarray, np.ndarray]:
    pos = np.stack([own_states(model, tok, p)[layer].numpy() for p, _ in pairs])
    neg = np.stack([own_states(model, tok, n)[layer].numpy() for _, n in pairs])
    return pos, neg


@torch.no_grad()
def block_outputs(model: Any, tok: Any, texts: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The output of every decoder block (captured with our own hooks) and the logits."""
    blocks = find_layers(model).blocks
    got: dict[int, torch.Tensor] = {}
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i, b in enumerate(blocks)
    ]
    try:
        enc = tok(texts, padding=True, return_tensors="pt")
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


def vec(dirs: dict[int, list[float] | torch.Tensor], model_type: str = "llama", hidden: int = 3, **kw: Any) -> SteeringVector:
    return SteeringVector(
        {i: torch.as_tensor(d, dtype=torch.float32) for i, d in dirs.items()}, model_type=model_type, hidden_size=hidden, **kw
    )


def unit(n: int, seed: int) -> torch.Tensor:
    d = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()

