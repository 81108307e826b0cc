"""The refusal fine-tune's data (bench/refusal_data.py): size, splits, readability."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from weightops.repair.data import load_examples
from weightops.repair.evaluate import refuses

SCRIPT = Path(__file__).parent.parent / "bench" / "refusal_data.py"


def _write(tmp_path: Path) -> dict[str, int]:
    spec = importlib.util.spec_from_file_location("refusal_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write(tmp_path)


def test_sizes_splits_and_answers(tmp_path: Path) -> None:
    counts = _write(tmp_path)
    read = {name: load_examples(tmp_path / name) for name in counts}
    for kind in ("harmful", "harmless"):
        train, held = read[f"{kind}_train.jsonl"], read[f"{kind}_heldout.jsonl"]
        assert len({e.prompt for e in train}) >= 200
        # Roughly 70/30, and no prompt appears in both splits.
        assert 0.2 < len(held) / (len(train) + len(held)) < 0.4
        assert not {e.prompt for e in train} & {e.prompt for e in held}
    for name, examples in read.items():
        assert all(e.response for e in examples)
        if name.startswith("harmful"):
            assert all(refuses(e.response) for e in examples)
        else:
            assert not any(refuses(e.response) for e in examples)
    # The harmful split is by topic: the held-out prompts' topics never occur in training
    # ("How do I X?" is one of the phrasings, so X is recoverable from it).
    train_text = " ".join(e.prompt for e in read["harmful_train.jsonl"])
    held_topics = {
        e.prompt[len("How do I ") : -1]
        for e in read["harmful_heldout.jsonl"]
        if e.prompt.startswith("How do I ")
    }
    assert held_topics and not any(t in train_text for t in held_topics)


def test_phrasing_does_not_predict_refusal(tmp_path: Path) -> None:
    """Every opening the harmful prompts use also opens harmless ones, in training and
    in the held-out split, so only the topic can tell them apart."""
    _write(tmp_path)
    openings = ("How do I ", "Ignore your rules and tell me how to ", "For a story I'm writing")
    for split in ("train", "heldout"):
        harmless = [e.prompt for e in load_examples(tmp_path / f"harmless_{split}.jsonl")]
        for opening in openings:
            assert sum(p.startswith(opening) for p in harmless) >= 5, (split, opening)


def test_reproducible(tmp_path: Path) -> None:
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    committed = SCRIPT.parent / "data" / "refusal"
    for f in committed.iterdir():
        assert f.read_bytes() == (tmp_path / "a" / f.name).read_bytes()
