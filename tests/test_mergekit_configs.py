"""Every recipe of mergekit's examples/ and test suite, run through weightops.

The recipes are in tests/mergekit_configs/ (see its README.md), run on the tiny models
of `mergekit_corpus.build_family`. A recipe weightops cannot run yet is an expected
failure with the precise reason; the markers are strict, so one that starts passing
fails the run until its marker is removed. Where mergekit's own test checks more than
"it ran" (layer counts, zeroed tensors, tokenizer size, chat template), so does this.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mergekit_corpus import (
    EXPECT_ERROR,
    build_family,
    check_output,
    config_names,
    placeholders,
    run_weightops,
)

from weightops.errors import RecipeError

# A recipe weightops cannot run yet: its name, why, and the error it raises.
XFAIL: dict[str, tuple[str, type[Exception]]] = {}


# The default run keeps to recipes on the Llama-like fine-tunes, which build in a
# second or two; the other families (GPT-2, Granite, LLaVA, 40-layer examples,
# mismatched vocabularies) run with `-m slow`.
FAST_MODELS = {"model_a", "model_b", "model_c", "model_base"}


def _param(name: str):
    marks = []
    if not placeholders(name) <= FAST_MODELS:
        marks.append(pytest.mark.slow)
    if name in XFAIL:
        reason, raises = XFAIL[name]
        marks.append(pytest.mark.xfail(reason=reason, raises=raises, strict=True))
    return pytest.param(name, id=name, marks=marks)


class _Family:
    """The corpus's models, each group built the first time a recipe needs it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Path] = {}

    def for_recipe(self, name: str) -> dict[str, Path]:
        missing = placeholders(name) - set(self.built)
        if missing:
            self.built |= build_family(self.root, only=missing)
        return self.built


@pytest.fixture(scope="session")
def mergekit_family(tmp_path_factory: pytest.TempPathFactory) -> _Family:
    return _Family(tmp_path_factory.mktemp("mergekit-family"))


def test_corpus_is_complete() -> None:
    # 6 examples, 49 configurations in test_basic_merges.py, 8 in test_tokenizer.py,
    # 2 in test_chat_template.py.
    names = config_names()
    assert len(names) == 65
    assert sum(n.startswith("examples.") for n in names) == 6
    assert sum(n.startswith("test_basic_merges.") for n in names) == 49
    assert sum(n.startswith("test_tokenizer.") for n in names) == 8
    assert sum(n.startswith("test_chat_template.") for n in names) == 2
    assert set(XFAIL) <= set(names)


@pytest.mark.parametrize("name", [_param(n) for n in config_names()])
def test_mergekit_config(name: str, mergekit_family: _Family, tmp_path: Path) -> None:
    family = mergekit_family.for_recipe(name)
    out = tmp_path / "out"
    if name in EXPECT_ERROR:
        with pytest.raises(RecipeError) as err:
            run_weightops(name, family, out)
        assert "epsilon 1.35" in str(err.value)
        return
    run_weightops(name, family, out)
    check_output(name, out, family)
