"""GGUF export: the Q2_K / Q4_K block formats, checked against the `gguf` package's own
dequantizer, and whole-checkpoint export read back with its reader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from safetensors.torch import load_file, save_file

from weightops.demo import tiny_model
from weightops.io.checkpoint import Checkpoint
from weightops.io.safetensors_file import FileReader
from weightops.quant.gguf_export import (
    BLOCK_BYTES,
    KQuant,
    export_gguf,
    fit_q2_k,
    fit_q4_k,
    quantize_q2_k,
    quantize_q4_k,
)
from weightops.quant.mixed import QuantError

QT = gguf.GGMLQuantizationType
FIT = {"Q2_K": fit_q2_k, "Q4_K": fit_q4_k}
QUANTIZE = {"Q2_K": quantize_q2_k, "Q4_K": quantize_q4_k}
# Relative Frobenius error on Gaussian weights (measured: Q2_K 0.269, Q4_K 0.074).
MAX_REL_ERR = {"Q2_K": 0.29, "Q4_K": 0.08}


def gaussian(rows: int = 64, n: int = 1024, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, n)) * 0.02).astype(np.float32)


def rel_err(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def expected(k: KQuant) -> np.ndarray:
    """d·scale·q − dmin·min written out per weight with plain loops over the sub-blocks,
    independently of KQuant.dequantize and of gguf."""
    rows, nb, _ = k.codes.shape
    sub = 256 // k.scales.shape[-1]
    out = np.empty((rows, nb, 256), dtype=np.float32)
    for j in range(k.scales.shape[-1]):
        d = k.d.astype(np.float32) * k.scales[..., j].astype(np.float32)
        m = k.dmin.astype(np.float32) * k.mins[..., j].astype(np.float32)
        q = k.codes[..., j * sub : (j + 1) * sub].astype(np.float32)
        out[..., j * sub : (j + 1) * sub] = d[..., None] * q - m[..., None]
    return out.reshape(rows, nb * 256)


def random_kquant(qtype: str, rows: int = 5, nb: int = 3, seed: int = 0) -> KQuant:
    """Every field random over its full range, so each bit of the layout is exercised."""
    rng = np.random.default_rng(seed)
    n_sub, top, int_top = {"Q2_K": (16, 3, 15), "Q4_K": (8, 15, 63)}[qtype]
    return KQuant(
        qtype=qtype,
        codes=rng.integers(0, top + 1, (rows, nb, 256), dtype=np.uint8),
        scales=rng.integers(0, int_top + 1, (rows, nb, n_sub), dtype=np.uint8),
        mins=rng.integers(0, int_top + 1, (rows, nb, n_sub), dtype=np.uint8),
        d=rng.uniform(1e-3, 1.0, (rows, nb)).astype(np.float16),
        dmin=rng.uniform(1e-3, 1.0, (rows, nb)).astype(np.float16),
    )


# --- block formats ----------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K"])
def test_packed_layout_matches_gguf_dequantizer(qtype):
    k = random_kquant(qtype)
    packed = k.pack()
    assert packed.dtype == np.uint8 and packed.shape == (5, 3 * BLOCK_BYTES[qtype])
    want = expected(k)
    np.testing.assert_array_equal(k.dequantize(), want)
    np.testing.assert_array_equal(gguf_dequantize(packed, QT[qtype]), want)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K"])
def test_single_codes_land_on_their_weight(qtype):
    """One nonzero code at a time, unit scales: gguf puts it back at the same index."""
    k = random_kquant(qtype, rows=1, nb=1)
    k.scales[:] = 1
    k.mins[:] = 0
    k.d[:] = 1.0
    for idx in (0, 1, 15, 16, 31, 32, 63, 64, 100, 127, 128, 200, 255):
        k.codes[:] = 0
        k.codes[0, 0, idx] = 1
        out = gguf_dequantize(k.pack(), QT[qtype]).ravel()
        assert np.nonzero(out)[0].tolist() == [idx]


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K"])
def test_quantize_is_exact_to_own_codes_and_accurate(qtype):
    w = gaussian()
    k = FIT[qtype](w)
    packed = QUANTIZE[qtype](w)
    assert packed.shape == (64, 1024 // 256 * BLOCK_BYTES[qtype])
    np.testing.assert_array_equal(packed, k.pack())
    ours = expected(k)
    np.testing.assert_array_equal(gguf_dequantize(packed, QT[qtype]), ours)
    assert rel_err(ours, w) < MAX_REL_ERR[qtype]


def test_q4_k_is_much_closer_than_q2_k():
    w = gaussian(seed=1)
    e2 = rel_err(fit_q2_k(w).dequantize(), w)
    e4 = rel_err(fit_q4_k(w).dequantize(), w)
    assert e4 < e2 / 3


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K"])
def test_awkward_blocks(qtype):
    rng = np.random.default_rng(2)
    w = np.zeros((6, 512), dtype=np.float32)
    w[1] = 0.5  # constant positive
    w[2] = -0.25  # constant negative
    w[3] = np.abs(rng.standard_normal(512))  # all positive: the min is clipped to 0
    w[4] = rng.standard_normal(512) * np.geomspace(1e-4, 10.0, 512)  # wide dynamic range
    w[5, ::97] = 3.0  # sparse spikes
    k = FIT[qtype](w)
    out = gguf_dequantize(k.pack(), QT[qtype])
    np.testing.assert_array_equal(out, expected(k))
    assert np.all(out[0] == 0)
    np.testing.assert_allclose(out[1:3], w[1:3], rtol=1e-3)
    assert rel_err(out[3:], w[3:]) < 0.5


@pytest.mark.parametrize("fit", [fit_q2_k, fit_q4_k])
def test_bad_matrices(fit):
    with pytest.raises(QuantError, match="multiple of 256"):
        fit(np.zeros((4, 320), dtype=np.float32))
    with pytest.raises(QuantError, match="multiple of 256"):
        fit(np.zeros(256, dtype=np.float32))
    bad = gaussian(2, 256)
    bad[1, 3] = np.nan
    with pytest.raises(QuantError, match="NaN"):
        fit(bad)
    with pytest.raises(QuantError, match="too large"):
        fit(np.full((1, 256), 1e9, dtype=np.float32))


# --- export -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama whose hidden size (256) lets its linear weights be k-quantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path_factory.mktemp("wide_llama")
    model.save_pretrained(folder)
    return folder


def original_weights(folder: Path) -> dict[str, np.ndarray]:
    ckpt = Checkpoint(folder)
    with FileReader() as reader:
        return {n: reader.read(i).float().numpy() for n, i in ckpt.tensors.items()}


def read_back(path: Path) -> tuple[gguf.GGUFReader, dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def check_tensors(path: Path, folder: Path, types: dict[str, str]) -> None:
    """Every tensor present with its type and shape, and its values close to the original."""
    _, tensors = read_back(path)
    originals = original_weights(folder)
    assert set(tensors) == set(originals) == set(types)
    for name, w in originals.items():
        t = tensors[name]
        assert t.tensor_type == QT[types[name]], name
        assert tuple(int(x) for x in reversed(t.shape)) == w.shape, name
        got = gguf_dequantize(t.data, t.tensor_type).reshape(w.shape)
        if types[name] == "F32":
            np.testing.assert_array_equal(got, w)
        elif types[name] == "F16":
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
        else:
            assert rel_err(got, w) < MAX_REL_ERR[types[name]] + 0.02, name


def test_export_narrow_model_keeps_everything_in_float(tmp_path):
    """Hidden size 64 is not a multiple of 256: nothing can be k-quantized."""
    folder = tiny_model(tmp_path / "m", "llama", seed=0)
    out = tmp_path / "m.gguf"
    report = export_gguf(folder, out)
    assert report["quantized_weights"] == 0 and report["bits_per_weight"] == 0.0
    assert report["bytes"] == out.stat().st_size
    assert set(report["types"].values()) == {"F16", "F32"}
    for name, info in Checkpoint(folder).tensors.items():
        assert report["types"][name] == ("F32" if len(info.shape) == 1 else "F16"), name
    reader, _ = read_back(out)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.embedding_length") == 64
    check_tensors(out, folder, report["types"])


def test_export_wide_model_quantizes_block_linears(wide_llama, tmp_path):
    q4 = {"model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    out = tmp_path / "w.gguf"
    report = export_gguf(wide_llama, out, q4_tensors=q4)
    types = report["types"]
    for name, qtype in types.items():
        if ".layers." in name and name.endswith("_proj.weight"):
            assert qtype == ("Q4_K" if name in q4 else "Q2_K"), name
        elif "layernorm" in name or name == "model.norm.weight":
            assert qtype == "F32", name
    assert types["model.embed_tokens.weight"] == "F16"
    assert types["lm_head.weight"] == "F16"
    assert 2.625 < report["bits_per_weight"] < 4.5
    assert not (tmp_path / "w.gguf.partial").exists()

    reader, _ = read_back(out)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.name") == wide_llama.name
    assert field(reader, "llama.block_count") == 2
    assert field(reader, "llama.embedding_length") == 256
    assert field(reader, "llama.context_length") == 512
    assert field(reader, "llama.feed_forward_length") == 512
    assert field(reader, "llama.attention.head_count") == 4
    assert field(reader, "llama.attention.head_count_kv") == 2
    check_tensors(out, wide_llama, types)


def test_export_mixed_budgets_and_default(wide_llama, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"
    low = "model.layers.0.self_attn.o_proj.weight"
    report = export_gguf(wide_llama, tmp_path / "a.gguf", mixed={name: 4.5, low: 2.85})
    assert report["types"][name] == "Q4_K"
    assert report["types"][low] == "Q2_K"
    report = export_gguf(wide_llama, tmp_path / "b.gguf", default="Q4_K")
    quantized = {t for t in report["types"].values() if t.endswith("_K")}
    assert quantized == {"Q4_K"} and report["bits_per_weight"] == 4.5


def test_export_bad_arguments(wide_llama, tmp_path):
    with pytest.raises(QuantError, match="no tensor named"):
        export_gguf(wide_llama, tmp_path / "x.gguf", q4_tensors={"model.layers.9.nope.weight"})
    with pytest.raises(QuantError, match="default type"):
        export_gguf(wide_llama, tmp_path / "x.gguf", default="Q3_K")
    assert not list(tmp_path.iterdir())


def test_export_failure_leaves_no_file(wide_llama, tmp_path):
    """A value beyond fp16 in a tensor kept as F16 stops the export without a half file."""
    folder = tmp_path / "big"
    folder.mkdir()
    for f in wide_llama.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights_file = next(folder.glob("*.safetensors"))
    tensors = load_file(weights_file)
    tensors["model.embed_tokens.weight"][0, 0] = 1e6
    save_file(tensors, weights_file, metadata={"format": "pt"})
    out = tmp_path / "big.gguf"
    with pytest.raises(QuantError, match="fp16 range"):
        export_gguf(folder, out)
    assert not out.exists() and not (tmp_path / "big.gguf.partial").exists()
