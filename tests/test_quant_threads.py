"""Quantizing with several threads: the same bytes as with one, a bad weight fails the
run cleanly, torch's thread count given back."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightops.quant.mixed import QuantError
from weightops.quant.model import quantize_model


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def folder_bytes(folder) -> dict[str, bytes]:
    # The model card and settings do not name the thread count; everything is compared.
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_threads_write_the_bytes_of_one_thread(small_llama, tmp_path, threads):
    # The row blocks of the quantizer's passes grow with the thread count.
    folder = small_llama[0]
    threads(1)
    quantize_model(folder, tmp_path / "one")
    threads(3)
    quantize_model(folder, tmp_path / "three")
    assert torch.get_num_threads() == 3
    one, three = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "three")
    assert one.keys() == three.keys()
    assert all(one[k] == three[k] for k in one)


# The last block's last linear (after most of the output is written), and one
# quantized together with the block's other matrices of the same inputs.
@pytest.mark.parametrize(
    "name", ["model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
)
def test_a_bad_weight_late_in_the_model_fails_the_run_and_writes_nothing(
    small_llama, tmp_path, threads, name
):
    folder = tmp_path / "bad"
    shutil.copytree(small_llama[0], folder)
    shard = next(folder.glob("*.safetensors"))
    state = load_file(shard)
    state[name][3, 5] = float("nan")
    save_file(state, shard, metadata={"format": "pt"})
    threads(2)
    with pytest.raises(QuantError, match=rf"^{name}: .*NaN"):
        quantize_model(folder, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    assert torch.get_num_threads() == 2


def test_the_cli_threads_option_gives_the_same_model_and_restores_torch(
    small_llama, tmp_path, threads
):
    from typer.testing import CliRunner

    from weightops.cli import app

    threads(1)
    quantize_model(small_llama[0], tmp_path / "lib")
    r = CliRunner().invoke(
        app, ["quantize", str(small_llama[0]), "-o", str(tmp_path / "cli"), "--threads", "2"]
    )
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 1
    assert folder_bytes(tmp_path / "lib") == folder_bytes(tmp_path / "cli")


def test_matrices_quantized_together_write_the_bytes_of_each_alone(
    small_llama, tmp_path, monkeypatch
):
    from weightops.quant import job

    sizes: list[int] = []
    together = job.quantize_together

    def counted(weights, **options):
        sizes.append(len(weights))
        return together(weights, **options)

    monkeypatch.setattr(job, "quantize_together", counted)
    quantize_model(small_llama[0], tmp_path / "together")
    assert max(sizes) > 1
    monkeypatch.setattr(job, "BATCH_VALUES", 0)
    sizes.clear()
    quantize_model(small_llama[0], tmp_path / "alone")
    assert set(sizes) == {1}
    together_bytes = folder_bytes(tmp_path / "together")
    alone_bytes = folder_bytes(tmp_path / "alone")
    assert together_bytes.keys() == alone_bytes.keys()
    assert all(together_bytes[k] == alone_bytes[k] for k in together_bytes)


def _reading_threads(monkeypatch, cores: int) -> list[str]:
    """Make torch's threads leave `cores - 1` cores free; record which threads read."""
    import threading

    from weightops.quant import job

    monkeypatch.setattr(job, "available_cores", lambda: cores)
    names: list[str] = []
    read_batch = job.QuantJob.read_batch

    def recorded(self, *args, **kwargs):
        names.append(threading.current_thread().name)
        return read_batch(self, *args, **kwargs)

    monkeypatch.setattr(job.QuantJob, "read_batch", recorded)
    return names


def test_reading_ahead_on_a_free_core_writes_the_same_bytes(
    small_llama, tmp_path, monkeypatch, threads
):
    threads(1)
    names = _reading_threads(monkeypatch, 4)
    quantize_model(small_llama[0], tmp_path / "ahead")
    assert any(n.startswith("weightops-read") for n in names)
    names.clear()
    monkeypatch.setattr("weightops.quant.job.available_cores", lambda: 1)
    quantize_model(small_llama[0], tmp_path / "inline")
    assert names and not any(n.startswith("weightops-read") for n in names)
    assert folder_bytes(tmp_path / "ahead") == folder_bytes(tmp_path / "inline")


def test_a_read_that_fails_ahead_fails_the_run_cleanly(small_llama, tmp_path, monkeypatch, threads):
    from weightops.errors import CheckpointError
    from weightops.io.safetensors_file import FileReader

    threads(1)
    names = _reading_threads(monkeypatch, 4)
    read = FileReader.read

    def failing(self, info, *args, **kwargs):
        if info.name == "model.layers.1.mlp.down_proj.weight":
            raise CheckpointError(f"{info.path}: reading {info.name!r} failed: injected")
        return read(self, info, *args, **kwargs)

    monkeypatch.setattr(FileReader, "read", failing)
    with pytest.raises(CheckpointError, match="injected"):
        quantize_model(small_llama[0], tmp_path / "q")
    assert any(n.startswith("weightops-read") for n in names)
    assert not (tmp_path / "q").exists()
