"""Shared fixtures: tiny checkpoints of real architectures, saved sharded.

Building a model costs about a second, so families are built once per session and
treated as read-only by the tests (tests that damage files copy them first).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from weightops.demo import fine_tune, tiny_model

FAMILY_NAMES = ["llama", "qwen2", "gemma", "gpt2"]


def _family(root: Path, family: str) -> dict[str, Path]:
    base = tiny_model(root / "base", family, seed=0, shard_size="60KB")
    return {
        "base": base,
        "ft_a": fine_tune(base, root / "ft_a", seed=1, shard_size="60KB"),
        "ft_b": fine_tune(base, root / "ft_b", seed=2, shard_size="60KB"),
        "ft_c": fine_tune(base, root / "ft_c", seed=3, shard_size="60KB"),
    }


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """{family: {"base", "ft_a", "ft_b", "ft_c": folder}} for every family."""
    root = tmp_path_factory.mktemp("families")
    return {f: _family(root / f, f) for f in FAMILY_NAMES}


@pytest.fixture(scope="session")
def llama(families: dict[str, dict[str, Path]]) -> dict[str, Path]:
    return families["llama"]


@pytest.fixture
def llama_copy(llama: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of the llama family that a test may damage."""
    return {k: Path(shutil.copytree(v, tmp_path / k)) for k, v in llama.items()}


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with the safetensors library
    (an independent reader, not weightops')."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def valid_value(spec):
    """A value a parameter accepts, chosen from its spec alone: the middle of its
    range, or 0.5 (False for flags, rounded for whole numbers)."""
    if spec.kind is bool:
        return False
    r = spec.range
    lo = None if r is None else (r.ge if r.ge is not None else r.gt)
    hi = None if r is None else (r.le if r.le is not None else r.lt)
    if lo is not None and hi is not None:
        v = (lo + hi) / 2
    elif lo is not None:
        v = lo + 0.5
    elif hi is not None:
        v = hi - 0.5
    else:
        v = 0.5
    return round(v) if spec.kind is int else v


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory: pytest.TempPathFactory):
    """A two-block Llama whose linears the quantizer takes (inputs 256 and 512), saved
    with the demo tokenizer; (folder, model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from weightops.demo import _tokenizer

    folder = tmp_path_factory.mktemp("q") / "m"
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    _tokenizer(folder)
    return folder, model
