"""Reading ahead on a background thread (weightops.io.background.ReadAhead)."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

from weightops.errors import CheckpointError
from weightops.io import background
from weightops.io.background import ReadAhead
from weightops.io.safetensors_file import FileReader, read_header


class Recording(FileReader):
    """A FileReader that logs each read and can hold reads back until released."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def read(self, info, rows=None):
        self.started.append(info.name if rows is None else f"{info.name}{list(rows)}")
        self.gate.wait(10)
        return super().read(info, rows)


@pytest.fixture
def stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(16, 8, generator=g) for i in range(6)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    infos, _ = read_header(path)
    return tensors, [infos[f"t{i}"] for i in range(6)], path


def test_reads_in_order_give_the_stored_tensors(stored):
    tensors, order, _ = stored
    with Recording() as files, ReadAhead(files, order) as ahead:
        got = [ahead.read(info) for info in order]
    for info, t in zip(order, got, strict=True):
        assert torch.equal(t, tensors[info.name])
    # Each tensor read once, in order.
    assert files.started == [info.name for info in order]


def test_reads_at_most_the_budget_ahead(stored, monkeypatch):
    _, order, _ = stored
    per = order[0].nbytes
    monkeypatch.setattr(background, "READ_AHEAD_BYTES", 2 * per)
    with Recording() as files, ReadAhead(files, order) as ahead:
        # Nothing asked for yet: two tensors' worth queued, no more.
        assert len(ahead._pending) == 2
        ahead.read(order[0])
        assert [info.name for info, _ in ahead._pending] == ["t1", "t2"]


def test_a_tensor_larger_than_the_budget_is_still_read_ahead_alone(stored, monkeypatch):
    _, order, _ = stored
    monkeypatch.setattr(background, "READ_AHEAD_BYTES", 1)
    with Recording() as files, ReadAhead(files, order) as ahead:
        assert [info.name for info, _ in ahead._pending] == ["t0"]
        ahead.read(order[0])
        assert [info.name for info, _ in ahead._pending] == ["t1"]


def test_skipped_tensors_are_dropped_and_others_read_directly(stored):
    tensors, order, _ = stored
    with Recording() as files, ReadAhead(files, order) as ahead:
        # t1 and t2 are never asked for; t4's rows and t0 (already passed) are direct.
        assert torch.equal(ahead.read(order[0]), tensors["t0"])
        assert torch.equal(ahead.read(order[3]), tensors["t3"])
        assert torch.equal(ahead.read(order[4], rows=(2, 5)), tensors["t4"][2:5])
        assert torch.equal(ahead.read(order[0]), tensors["t0"])
        assert torch.equal(ahead.read(order[4]), tensors["t4"])
        assert torch.equal(ahead.read(order[5]), tensors["t5"])
    assert files.started.count("t0") == 2
    assert "t4[2, 5]" in files.started
    assert files.started.count("t4") == 1


def test_a_failed_read_raises_where_the_tensor_is_asked_for(stored):
    tensors, order, path = stored
    # Cut the file inside t3: the reads before it still succeed.
    with path.open("r+b") as f:
        f.truncate(order[3].start + 4)
    with FileReader() as files, ReadAhead(files, order) as ahead:
        for info in order[:3]:
            assert torch.equal(ahead.read(info), tensors[info.name])
        with pytest.raises(CheckpointError, match="file ended while reading 't3'"):
            ahead.read(order[3])


def test_close_drops_reads_not_started(stored):
    _, order, _ = stored
    files = Recording()
    files.gate.clear()
    ahead = ReadAhead(files, order)
    threading.Timer(0.2, files.gate.set).start()
    ahead.close()
    files.close()
    # The read running when closed finished; the queued ones never started.
    assert len(files.started) == 1
