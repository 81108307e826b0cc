"""The mixed 2/4-bit matrix quantizer and its packed form."""

from __future__ import annotations

import json
import math

import pytest
import torch

from weightops.compat import causal_lm
from weightops.quant.grids import _grid, _refine
from weightops.quant.mixed import (
    QuantError,
    bits_per_weight,
    choose_k4,
    dequantize,
    quantize,
    quantize_with_reference,
)
from weightops.quant.packing import pack_bits as _pack_bits
from weightops.quant.packing import pack_codes as _pack
from weightops.quant.packing import unpack_bits as _unpack_bits
from weightops.quant.packing import unpack_codes as _unpack


def weight(out: int = 96, inp: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.02


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 64), generator=g)
    codes[0, :] = 2**bits - 1  # the top code sets the sign bit of the word
    words = _pack(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (7, 64 * bits // 32)
    assert torch.equal(_unpack(words, bits), codes)


def test_packing_order_is_low_bits_first():
    codes = torch.tensor([[1, 2, 3] + [0] * 13])
    assert _pack(codes, 2).item() == 1 | (2 << 2) | (3 << 4)


def test_group_map_round_trip():
    mask = torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = _pack_bits(mask)
    assert packed.shape == (5, 2) and packed.dtype == torch.uint8
    assert torch.equal(_unpack_bits(packed, 13), mask)


def test_round_trip_equals_the_quantizers_own_dequantization_exactly():
    packed, reference = quantize_with_reference(weight())
    assert torch.equal(dequantize(packed), reference)


def test_bits_are_counted_from_what_is_stored():
    p = quantize(weight(inp=1024))
    stored = sum(
        t.numel() * t.element_size() * 8 for t in (p.q2, p.q4, p.gmap, p.scale, p.zero, p.super)
    )
    assert p.bits == stored
    assert p.bits_per_weight == pytest.approx(bits_per_weight(1024, 64, p.k4))
    assert p.bits_per_weight <= 2.85


def test_k4_is_the_largest_aligned_count_within_budget():
    # 2048 inputs, groups of 64: 32 groups, so k4 moves in steps of 4.
    k4 = choose_k4(2048, 64, 2.85)
    assert k4 % 4 == 0
    assert bits_per_weight(2048, 64, k4) <= 2.85 < bits_per_weight(2048, 64, k4 + 4)
    # A row of 3 groups cannot keep steps of 4: any count is allowed.
    assert choose_k4(192, 64, 4.5) == 3
    with pytest.raises(QuantError, match="floor"):
        choose_k4(2048, 64, 2.0)


def test_every_row_has_the_same_number_of_4bit_groups_and_they_are_the_wide_ones():
    w = weight(out=8, inp=512)
    wide = [(r, (r * 3) % 8) for r in range(8)]
    for r, grp in wide:
        w[r, grp * 64 : (grp + 1) * 64] *= 50  # one group per row with a huge range
    p = quantize(w, k4=1)
    is4 = _unpack_bits(p.gmap, 8)
    assert torch.equal(is4.sum(1), torch.ones(8, dtype=torch.long))
    for r, grp in wide:
        assert is4[r, grp]


def test_mixed_beats_all_2bit_and_plain_rounding():
    w = weight(out=128, inp=1024)
    w[:, :64] *= 8  # a few sensitive groups, as in real layers
    err = lambda q: ((q - w).norm() / w.norm()).item()  # noqa: E731
    mixed = err(dequantize(quantize(w)))
    two = err(dequantize(quantize(w, k4=0)))
    g = w.reshape(128, -1, 64)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / 3
    rtn = err((((g - lo) / s).round().clamp(0, 3) * s + lo).reshape(128, 1024))
    assert mixed < two < rtn


def test_importance_protects_important_inputs():
    w = weight(out=64, inp=256)
    h = torch.ones(256)
    h[:32] = 100.0
    plain, weighted = dequantize(quantize(w, k4=0)), dequantize(quantize(w, k4=0, importance=h))
    cols = slice(0, 32)
    assert (weighted - w)[:, cols].square().sum() < (plain - w)[:, cols].square().sum()


def test_all_4bit_is_close():
    w = weight()
    p = quantize(w, k4=512 // 64)
    rel = ((dequantize(p) - w).norm() / w.norm()).item()
    assert rel < 0.12  # 4-bit asymmetric groups of 64 on Gaussian weights: about 0.09
    assert p.q2.numel() == 0


@pytest.mark.parametrize(
    "w, kwargs, needle",
    [
        (torch.zeros(4, 100), {}, "does not divide"),
        (torch.zeros(4, 128), {"group_size": 24}, "multiple of 16"),
        (torch.zeros(4, 4, 4), {}, "2-D"),
        (torch.full((4, 128), math.nan), {}, "NaN"),
        (torch.zeros(4, 128), {"k4": 3}, "outside"),
        (torch.zeros(4, 128), {"importance": torch.ones(5)}, "importance"),
        (torch.zeros(4, 128), {"hessian": torch.eye(5)}, "hessian"),
        (torch.zeros(4, 128), {"outliers": 129}, "outliers"),
    ],
)
def test_bad_input(w, kwargs, needle):
    with pytest.raises(QuantError, match=needle):
        quantize(w, **kwargs)


def _group_error(groups, h, s, lo, bits):
    q = ((groups - lo[..., None]) / s[..., None]).round().clamp(0, 2**bits - 1)
    return ((q * s[..., None] + lo[..., None] - groups).square() * h).sum(-1)


@pytest.mark.parametrize("bits", [2, 4])
def test_refinement_never_raises_a_groups_error_and_usually_lowers_it(bits):
    g = torch.Generator().manual_seed(bits)
    groups = torch.distributions.StudentT(3.0).sample((64, 8, 64)) * 0.02
    h = torch.rand(8, 64, generator=g) + 0.1
    s, lo = _grid(groups, h, bits, (1.0, 0.9, 0.8))
    before = _group_error(groups, h, s, lo, bits)
    after = _group_error(groups, h, *_refine(groups, h, s, lo, bits), bits)
    assert (after <= before * (1 + 1e-5) + 1e-12).all()
    assert (after < before * 0.999).float().mean() > 0.5


def _output_error(w, q, x):
    return ((w - q) @ x.T).square().sum().item()


def test_hessian_feedback_lowers_the_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    w = weight(out=64, inp=256)
    # Inputs with strongly correlated features, as activations of real layers are.
    mix = torch.randn(256, 256, generator=g) * 0.3 + torch.eye(256)
    x = torch.randn(2048, 256, generator=g) @ mix
    hessian = x.T @ x / x.shape[0]
    plain = dequantize(quantize(w, k4=0, importance=hessian.diagonal()))
    fed = dequantize(quantize(w, k4=0, hessian=hessian))
    assert _output_error(w, fed, x) < 0.8 * _output_error(w, plain, x)


def test_hessian_feedback_with_uncorrelated_inputs_is_plain_rounding():
    # With a diagonal H the inverse's Cholesky factor is diagonal: no error is pushed
    # onto other inputs, so every code is the nearest grid point, as without H.
    w = weight(out=32, inp=256)
    h = torch.linspace(0.5, 2.0, 256)
    a = dequantize(quantize(w, importance=h))
    b = dequantize(quantize(w, hessian=torch.diag(h)))
    assert torch.equal(a, b)


def test_outliers_are_stored_exactly_and_leave_the_grid_alone():
    w = weight(out=16, inp=256)
    spikes = [(r, (37 * r + 5) % 256) for r in range(16)]
    for r, c in spikes:
        w[r, c] = 0.5  # ~25 standard deviations
    packed, reference = quantize_with_reference(w, k4=0, outliers=1)
    assert torch.equal(dequantize(packed), reference)
    for r, c in spikes:
        assert packed.oidx[r, 0].item() == c
        assert reference[r, c].item() == torch.tensor(0.5).half().item()
    without = dequantize(quantize(w, k4=0))
    err = lambda q: ((q - w).norm() / w.norm()).item()  # noqa: E731
    assert err(reference) < 0.7 * err(without)
    assert packed.bits == sum(t.numel() * t.element_size() * 8 for t in packed.parts().values())
    assert packed.bits_per_weight == pytest.approx(bits_per_weight(256, 64, 0, 1))
    # 32 bits per outlier: a 16-bit column index and an fp16 value.
    assert bits_per_weight(256, 64, 0, 1) - bits_per_weight(256, 64, 0) == pytest.approx(32 / 256)


def test_outliers_with_hessian_feedback_round_trip_exactly():
    g = torch.Generator().manual_seed(3)
    w = weight(out=24, inp=192)
    x = torch.randn(512, 192, generator=g)
    packed, reference = quantize_with_reference(w, outliers=2, hessian=x.T @ x / 512)
    assert packed.outliers == 2 and torch.equal(dequantize(packed), reference)


def test_constant_groups_survive():
    w = torch.zeros(4, 128)
    w[1] = 0.5
    assert torch.allclose(dequantize(quantize(w)), w, atol=1e-3)


# ---------------------------------------------------------------- whole models


def test_quantized_model_loads_and_runs_on_the_packed_weights(small_llama, tmp_path):
    from weightops.quant.model import MANIFEST, QuantLinear, load, quantize_model

    folder, model = small_llama
    manifest = quantize_model(folder, tmp_path / "q", avg_bits=2.85)
    assert json_version(tmp_path / "q" / MANIFEST) == 2
    assert manifest["quantized_bits_per_weight"] <= 2.85
    q = load(tmp_path / "q")
    linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down per block
    # Each QuantLinear computes with exactly the dequantized packed weight.
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    layer = q.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ dequantize(layer.packed()).T)
    with torch.no_grad():
        ref, got = model(ids).logits, q(ids).logits
    assert torch.isfinite(got).all() and got.shape == ref.shape
    # Embeddings and norms are kept, in 16 bits by default.
    assert torch.equal(
        q.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16().float()
    )


def test_an_already_quantized_model_is_refused(small_llama, tmp_path):
    from weightops.quant.model import quantize_model

    folder, _ = small_llama
    quantize_model(folder, tmp_path / "q")
    with pytest.raises(QuantError, match="already quantized"):
        quantize_model(tmp_path / "q", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def json_version(path) -> int:
    import json

    return json.loads(path.read_text())["version"]


def test_quantize_cli_and_eval(small_llama, tmp_path):
    from typer.testing import CliRunner

    from weightops.cli import app

    folder, _ = small_llama
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    r = run("quantize", folder, "-o", tmp_path / "q", "--avg-bits", 2.85)
    assert r.exit_code == 0, r.output
    r = run("quantize", "eval", folder, tmp_path / "q", "--text", text, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["bits_per_weight"] <= 2.85 and report["tokens"] > 16
    assert math.isfinite(report["perplexity_quantized"]) and len(report["rel_error"]) == 14

    short = tmp_path / "short.txt"
    short.write_text("x")
    for args, needle in [
        (("quantize", "eval", folder, tmp_path / "q", "--text", short), "at least"),
        (("quantize", folder, "-o", tmp_path / "bad", "--group-size", 24), "multiple of 16"),
        (("quantize", folder, "-o", tmp_path / "bad", "--avg-bits", 1.5), "floor"),
        (("quantize", folder, "-o", tmp_path / "bad", "--bits", 3), "--bits 3"),
        (("quantize", folder, "-o", tmp_path / "bad", "--outliers", 0.5), "--outliers 0.5"),
    ]:
        r = run(*args)
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and needle in r.stderr, r.output
        assert not (tmp_path / "bad").exists()


def test_layerwise_calibration_gives_the_whole_models_input_second_moments(small_llama):
    from weightops.io.checkpoint import Checkpoint
    from weightops.quant.calibrate import LayerwiseCalibration

    folder, model = small_llama
    text = "the quick brown fox jumps over the lazy dog. " * 4
    name = "model.layers.1.mlp.down_proj.weight"
    # q and k read the same activations, so they may share one matrix: both must be right.
    q_name, k_name = (f"model.layers.0.self_attn.{p}_proj.weight" for p in "qk")
    calibration = LayerwiseCalibration(Checkpoint(folder), [text], window=64)
    got_all = calibration.layer(0)
    assert len(got_all) == 7  # q, k, v, o, gate, up, down
    with pytest.raises(QuantError, match="one layer at a time"):
        calibration.layer(0)
    got_all.update(calibration.layer(1))
    got = got_all[name]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids[0]
    seen = []
    seen_q = []
    handles = [
        model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
            lambda m, a: seen.append(a[0])
        ),
        model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a: seen_q.append(a[0])
        ),
    ]
    with torch.no_grad():
        for start in range(0, ids.numel(), 64):
            model(ids[start : start + 64].unsqueeze(0))
    for h in handles:
        h.remove()
    for inputs, matrix in ((seen, got), (seen_q, got_all[q_name]), (seen_q, got_all[k_name])):
        x = torch.cat([s.reshape(-1, s.shape[-1]) for s in inputs]).double().numpy()
        expected = torch.from_numpy(x.T @ x / x.shape[0]).float()
        torch.testing.assert_close(matrix, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(QuantError, match="at least"):
        LayerwiseCalibration(Checkpoint(folder), ["x"])


def test_calibrated_model_with_outliers_round_trips_through_the_folder(small_llama, tmp_path):
    from weightops.quant.model import QuantLinear, load, quantize_model

    folder, _ = small_llama
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    manifest = quantize_model(folder, tmp_path / "q", calib=calib, outliers=1 / 128, avg_bits=2.9)
    assert manifest["calibrated"] and manifest["quantized_bits_per_weight"] <= 2.9
    down = manifest["tensors"]["model.layers.0.mlp.down_proj.weight"]
    assert down["outliers"] == 512 // 128
    q = load(tmp_path / "q")
    layer = q.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.packed().outliers == 4
    x = torch.randn(2, layer.in_features)
    torch.testing.assert_close(layer(x), x @ dequantize(layer.packed()).T)
    with pytest.raises(QuantError, match="outliers"):
        quantize_model(folder, tmp_path / "bad", outliers=0.5)
    assert not (tmp_path / "bad").exists()


def test_kept_tensors_are_16bit_and_lm_head_is_optional(small_llama, tmp_path):
    from weightops.io.checkpoint import Checkpoint
    from weightops.quant.model import QuantLinear, load, quantize_model

    folder, _ = small_llama
    quantize_model(folder, tmp_path / "a")
    stored = Checkpoint(tmp_path / "a").tensors
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert "lm_head.weight" in stored and "lm_head.q2" not in stored

    manifest = quantize_model(folder, tmp_path / "b", lm_head=True, keep_dtype=None)
    assert "lm_head.weight" in manifest["tensors"]
    assert Checkpoint(tmp_path / "b").tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert isinstance(load(tmp_path / "b").lm_head, QuantLinear)


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_layerwise_calibration_matches_whole_model_hooks_across_families(families, family):
    # Gemma scales its embeddings before block 0 and Qwen2 has attention biases: the
    # one-block stub must reproduce what the whole model feeds each block.
    from transformers import AutoTokenizer

    from weightops.io.checkpoint import Checkpoint
    from weightops.quant.calibrate import LayerwiseCalibration

    folder = families[family]["base"]
    text = "a tiny calibration text, repeated. " * 6
    calibration = LayerwiseCalibration(Checkpoint(folder), [text], window=48)
    calibration.layer(0)
    got = calibration.layer(1)["model.layers.1.mlp.down_proj.weight"]
    model = causal_lm(folder, torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids[0]
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0])
    )
    with torch.no_grad():
        for start in range(0, ids.numel(), 48):
            model(ids[start : start + 48].unsqueeze(0))
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    torch.testing.assert_close(got, (x.T @ x / x.shape[0]).float(), rtol=1e-4, atol=1e-6)


def test_an_encoder_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    from transformers import BertConfig, BertModel

    from weightops.quant.model import quantize_model

    cfg = BertConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    out = tmp_path / "q"
    with pytest.raises(QuantError, match="not a causal language model"):
        quantize_model(tmp_path / "bert", out)
    assert not out.exists()


def test_unrecognised_block_weights_are_refused_not_half_quantized(small_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from weightops.quant.model import quantize_model

    folder = tmp_path / "odd"
    shutil.copytree(small_llama[0], folder)
    shard = next(folder.glob("*.safetensors"))
    state = load_file(shard)
    state["model.layers.0.mlp.mystery_proj.weight"] = torch.zeros(64, 64)
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(QuantError, match="mystery_proj"):
        quantize_model(folder, tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    "manifest",
    [
        "{not json",
        "[]",
        '{"version": 2, "group_size": 64, "tensors": {"x.nowhere.weight": '
        '{"shape": [4, 64], "k4": 0}}}',
        '{"version": 2, "tensors": {}}',
    ],
)
def test_load_refuses_a_broken_folder_without_a_traceback(small_llama, tmp_path, manifest):
    from weightops.quant import load
    from weightops.quant.model import quantize_model

    folder = tmp_path / "q"
    quantize_model(small_llama[0], folder)
    (folder / "weightops_quant.json").write_text(manifest)
    with pytest.raises(QuantError):
        load(folder)
