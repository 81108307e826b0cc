"""The two tasks of the real-model merge benchmark (bench/merge_tasks.py): splits,
answers and scoring."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "bench" / "merge_tasks.py"
_spec = importlib.util.spec_from_file_location("merge_tasks", SCRIPT)
tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tasks)


def _words(prompt: str) -> set[str]:
    """The lower-case words after the prompt's instruction ("…: ")."""
    return set(re.findall(r"[a-z]+", prompt.split(":", 1)[1]))


def test_same_arguments_same_examples() -> None:
    a = tasks.examples("caps", "heldout", 20, seed=3)
    b = tasks.examples("caps", "heldout", 20, seed=3)
    assert [(e.prompt, e.response) for e in a] == [(e.prompt, e.response) for e in b]
    assert len({e.prompt for e in a}) == 20


def test_caps_answers_and_splits() -> None:
    train = tasks.examples("caps", "train", tasks.TRAIN_N)
    held = tasks.examples("caps", "heldout", 64)
    recombined = tasks.examples("caps", "recombined", 64)
    ex = held[0]
    phrase = ex.prompt.removeprefix("Rewrite in capital letters: ")
    assert ex.response == phrase.upper() and 2 <= len(phrase.split()) <= 4
    train_words = set().union(*(_words(e.prompt) for e in train))
    # Held-out phrases share no word with training; recombined ones use only its words
    # and are never a training prompt.
    assert not any(_words(e.prompt) & train_words for e in held)
    assert all(_words(e.prompt) <= train_words for e in recombined)
    assert not {e.prompt for e in recombined} & {e.prompt for e in train}


def test_sentiment_labels_and_unseen_opinion_words() -> None:
    train = tasks.examples("sentiment", "train", tasks.TRAIN_N)
    held = tasks.examples("sentiment", "heldout", 64)
    assert {e.response for e in held} == {"positive", "negative"}
    train_words = set().union(*(_words(e.prompt) for e in train))
    opinion = set(tasks.POSITIVE) | set(tasks.NEGATIVE)
    for e in held:
        (word,) = _words(e.prompt) & opinion
        assert word not in train_words
        assert (word in tasks.POSITIVE) == (e.response == "positive")


def test_correct() -> None:
    assert tasks.correct("caps", " THE GREEN RIVER.", "THE GREEN RIVER")
    assert not tasks.correct("caps", "The Green River", "THE GREEN RIVER")
    assert not tasks.correct("caps", "THE GREEN RIVER, SIR", "THE GREEN RIVER")
    assert tasks.correct("sentiment", "Positive.", "positive")
    assert not tasks.correct("sentiment", "The review is positive", "positive")
