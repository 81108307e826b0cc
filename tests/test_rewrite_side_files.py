"""The side files of a rewritten checkpoint are copied and checked on a thread of their
own beside the tensors' work (weightops.io.rewrite.staged_model): a bad one still fails
the job, early, and nothing is left behind either way."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from conftest import load_state

from weightops.errors import CheckpointError
from weightops.io import rewrite, sidefiles
from weightops.io.checkpoint import Checkpoint


def _rewrite(source: Path, out: Path, transform) -> Path:
    return rewrite.rewrite_checkpoint(
        Checkpoint(source),
        out,
        transform,
        title="t",
        summary=[],
        settings={},
        tag="test",
    )


def _leftovers(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(out.name))


def test_side_files_are_copied_whole(llama, tmp_path):
    out = _rewrite(llama["base"], tmp_path / "out", lambda name, t: t)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (llama["base"] / name).read_bytes()
    assert (out / "config.json").is_file()


def test_a_bad_tokenizer_fails_the_job_before_its_tensors_are_done(llama_copy, tmp_path):
    (llama_copy["base"] / "tokenizer.json").write_text('{"model": {"vocab": {"a": 1,}}}')
    seen = []

    def slow(name, tensor):
        # Each tensor takes a while: the side files' check is long done by the last.
        seen.append(name)
        threading.Event().wait(0.02)
        return tensor

    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not valid JSON"):
        _rewrite(llama_copy["base"], out, slow)
    total = len(Checkpoint(llama_copy["base"]).tensors)
    assert 0 < len(seen) < total
    assert _leftovers(tmp_path, out) == []


def test_a_failed_job_waits_for_the_side_files_before_removing_its_folder(
    llama, tmp_path, monkeypatch
):
    started, written = threading.Event(), []
    copy = sidefiles.copy_tokenizer

    def slow_copy(source, folder, *args):
        started.set()
        threading.Event().wait(0.3)
        names = copy(source, folder, *args)
        written.append(folder)
        return names

    monkeypatch.setattr(sidefiles, "copy_tokenizer", slow_copy)

    def failing(name, tensor):
        started.wait()
        raise RuntimeError("the job broke")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the job broke"):
        _rewrite(llama["base"], out, failing)
    # The copy finished into the staging folder, which was removed after it.
    assert written and not written[0].exists()
    assert _leftovers(tmp_path, out) == []


def test_staged_check_raises_only_once_the_copy_failed(tmp_path):
    pending: Future[None] = Future()
    staged = rewrite.Staged(tmp_path, None, pending)  # type: ignore[arg-type]
    staged.check()
    pending.set_exception(CheckpointError("tokenizer.json: broken"))
    with pytest.raises(CheckpointError, match="broken"):
        staged.check()
    done: Future[None] = Future()
    done.set_result(None)
    rewrite.Staged(tmp_path, None, done).check()  # type: ignore[arg-type]


def test_tensors_are_unchanged_by_the_thread(llama, tmp_path):
    out = _rewrite(llama["base"], tmp_path / "out", lambda name, t: t)
    a, b = load_state(llama["base"]), load_state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
