"""GGUF export read back with the `gguf` package's reader as llama.cpp reads it: the
architecture and hyper-parameter keys, the tokenizer, tensor names, types and shapes, and
every tensor's values against the checkpoint (q/k rows put back in Hugging Face order)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from safetensors.torch import load_file, save_file

from weightops.demo import tiny_model
from weightops.io.checkpoint import Checkpoint
from weightops.io.safetensors_file import FileReader
from weightops.quant.gguf_export import block_type, export_gguf
from weightops.quant.gguf_llama import PROBE_TEXT
from weightops.quant.mixed import QuantError

QT = gguf.GGMLQuantizationType
# Bounds on the relative Frobenius error of a whole tensor of ~N(0, 0.02) weights, from
# the block tests (tests/test_gguf_blocks.py) plus a margin for small tensors.
MAX_REL_ERR = {"Q2_K": 0.31, "Q4_K": 0.1, "Q4_0": 0.1, "Q5_0": 0.06}
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer(folder: Path) -> None:
    """A byte-level BPE vocabulary of 300 ids (GPT-2 style), specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog " * 4, "merge the weights then " * 4]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)


def llama(folder: Path, hidden: int, ffn: int, *, tied: bool, seed: int = 0) -> Path:
    """A 2-layer Llama (4 heads, 2 key/value heads) with a BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=512,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    bpe_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hidden 96 (not a multiple of 256, a multiple of 32), ffn 256: attention and
    gate/up fall back, down_proj is a k-quant; embeddings tied."""
    return llama(tmp_path_factory.mktemp("tied"), 96, 256, tied=True)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hidden 256, ffn 512: every block linear fits the k-quants; an untied lm_head."""
    return llama(tmp_path_factory.mktemp("wide"), 256, 512, tied=False, seed=1)


def originals(folder: Path) -> dict[str, np.ndarray]:
    ckpt = Checkpoint(folder)
    with FileReader() as reader:
        return {n: reader.read(i).float().numpy() for n, i in ckpt.tensors.items()}


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def hf_name(gguf_name: str) -> str:
    """llama.cpp name -> Hugging Face Llama name, written out by hand."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    _, layer, part, suffix = gguf_name.split(".")
    hf = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }[part]
    return f"model.layers.{layer}.{hf}.{suffix}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order back to Hugging Face's: within each head, row 2i came
    from row i of the first half and row 2i + 1 from row i of the second half."""
    out = np.empty_like(w)
    hd = w.shape[0] // n_head
    for h in range(n_head):
        for i in range(hd // 2):
            out[h * hd + i] = w[h * hd + 2 * i]
            out[h * hd + hd // 2 + i] = w[h * hd + 2 * i + 1]
    return out


def rel_err(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def check_values(path: Path, folder: Path, want_types: dict[str, str]) -> None:
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(want_types)
    source = originals(folder)
    for name, t in tensors.items():
        w = source[hf_name(name)]
        assert t.tensor_type == QT[want_types[name]], name
        # GGUF lists dimensions innermost first.
        assert tuple(int(x) for x in reversed(t.shape)) == w.shape, name
        got = gguf_dequantize(t.data, t.tensor_type).reshape(w.shape)
        if ".attn_q." in name:
            got = unpermute(got, 4)
        elif ".attn_k." in name:
            got = unpermute(got, 2)
        kind = want_types[name]
        if kind == "F32":
            np.testing.assert_array_equal(got, w, err_msg=name)
        elif kind == "F16":
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
        else:
            assert rel_err(got, w) < MAX_REL_ERR[kind], (name, rel_err(got, w))


def expected_types(folder: Path, linear: dict[str, str], tied: bool) -> dict[str, str]:
    types = {"token_embd.weight": "F16", "output_norm.weight": "F32"}
    if not tied:
        types["output.weight"] = "F16"
    for i in range(2):
        for part, kind in linear.items():
            types[f"blk.{i}.{part}.weight"] = kind
        types[f"blk.{i}.attn_norm.weight"] = "F32"
        types[f"blk.{i}.ffn_norm.weight"] = "F32"
    return types


def test_fallback_types_are_llama_cpps():
    """llama-quant.cpp: Q2_K -> Q4_0 and Q4_K -> Q5_0 when rows are not a multiple of
    256; F16 when they are not a multiple of 32 either."""
    assert [block_type("Q2_K", n) for n in (256, 512, 576, 96, 80)] == [
        "Q2_K", "Q2_K", "Q4_0", "Q4_0", "F16",
    ]  # fmt: skip
    assert [block_type("Q4_K", n) for n in (1536, 576, 48)] == ["Q4_K", "Q5_0", "F16"]


def test_tied_model_layout_metadata_and_values(tied, tmp_path):
    out = tmp_path / "t.gguf"
    report = export_gguf(tied, out, pre_tokenizer="gpt-2")
    linear = {p: "Q4_0" for p in ("attn_q", "attn_k", "attn_v", "attn_output")}
    linear.update(ffn_gate="Q4_0", ffn_up="Q4_0", ffn_down="Q2_K")
    types = expected_types(tied, linear, tied=True)
    assert report["types"] == types
    assert report["counts"] == {"Q4_0": 12, "Q2_K": 2, "F32": 5, "F16": 1}
    # Weights: 2 layers of q,o (96·96), k,v (48·96), gate,up (256·96) at 4.5 bits and
    # down (96·256) at 2.625 bits.
    n45 = 2 * (2 * 96 * 96 + 2 * 48 * 96 + 2 * 256 * 96)
    n26 = 2 * 96 * 256
    assert report["quantized_weights"] == n45 + n26
    assert report["bits_per_weight"] == pytest.approx((4.5 * n45 + 2.625 * n26) / (n45 + n26))
    check_values(out, tied, types)

    reader = gguf.GGUFReader(out)
    want = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.name": tied.name,
        "general.file_type": 10,
        "general.quantization_version": 2,
        "llama.block_count": 2,
        "llama.context_length": 512,
        "llama.embedding_length": 96,
        "llama.feed_forward_length": 256,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 50000.0,
        "llama.rope.dimension_count": 24,
        "llama.vocab_size": 320,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.chat_template": TEMPLATE,
    }
    for key, value in want.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)


def test_tokenizer_as_llama_cpp_reads_it(tied, tmp_path):
    out = tmp_path / "t.gguf"
    export_gguf(tied, out, pre_tokenizer="gpt-2")
    reader = gguf.GGUFReader(out)
    spec = json.loads((tied / "tokenizer.json").read_text())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        by_id[added["id"]] = added["content"]
    n = len(by_id)
    assert n == 300
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[:n] == [by_id[i] for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 320)]
    types = field(reader, "tokenizer.ggml.token_type")
    # 3 = control (the special tokens, ids 0-2), 1 = normal, 5 = unused padding ids.
    assert types == [3, 3, 3] + [1] * (n - 3) + [5] * (320 - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.merges") == merges
    assert field(reader, "tokenizer.ggml.bos_token_id") == SPECIALS.index("<|im_start|>")
    assert field(reader, "tokenizer.ggml.eos_token_id") == SPECIALS.index("<|im_end|>")
    assert field(reader, "tokenizer.ggml.padding_token_id") == SPECIALS.index("<|endoftext|>")


def test_untied_model_k_quants_and_q4(wide, tmp_path):
    out = tmp_path / "w.gguf"
    q4 = ["model.layers.0.self_attn.v_proj.weight"]
    mixed = {"model.layers.1.mlp.down_proj.weight": 4.5, "model.layers.1.mlp.up_proj.weight": 3}
    report = export_gguf(wide, out, q4_tensors=q4, mixed=mixed, pre_tokenizer="gpt-2")
    parts = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    types = expected_types(wide, {p: "Q2_K" for p in parts}, tied=False)
    types["blk.0.attn_v.weight"] = "Q4_K"
    types["blk.1.ffn_down.weight"] = "Q4_K"
    assert report["types"] == types
    check_values(out, wide, types)

    out4 = tmp_path / "w4.gguf"
    report = export_gguf(wide, out4, default="Q4_K", pre_tokenizer="gpt-2")
    assert {t for n, t in report["types"].items() if n.startswith("blk.")} == {"Q4_K", "F32"}
    assert report["bits_per_weight"] == 4.5
    assert field(gguf.GGUFReader(out4), "general.file_type") == 14


def test_qwen2_keeps_rows_and_writes_biases(tmp_path):
    """Qwen2 runs with NeoX-style RoPE in llama.cpp: q/k rows stay, biases are written."""
    folder = tiny_model(tmp_path / "q", "qwen2", layers=1)
    bpe_tokenizer(folder)
    out = tmp_path / "q.gguf"
    report = export_gguf(folder, out, pre_tokenizer="qwen2")
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == "qwen2"
    tensors = {t.name: t for t in reader.tensors}
    source = originals(folder)
    for part, hf in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
        bias = tensors[f"blk.0.{part}.bias"]
        assert bias.tensor_type == QT.F32
        want = source[f"model.layers.0.self_attn.{hf}.bias"]
        np.testing.assert_array_equal(np.asarray(bias.data).ravel(), want)
        # Hidden 64: Q2_K falls back to Q4_0; rows compared in their original order.
        t = tensors[f"blk.0.{part}.weight"]
        assert report["types"][t.name] == "Q4_0"
        w = source[f"model.layers.0.self_attn.{hf}.weight"]
        got = gguf_dequantize(t.data, t.tensor_type).reshape(w.shape)
        assert rel_err(got, w) < MAX_REL_ERR["Q4_0"]
    assert "output.weight" not in tensors


def test_pre_tokenizer_identified_by_probe_hash(tied, tmp_path):
    """Without a name, an unknown vocabulary is refused; the SmolLM2 vocabulary (when
    it is on this machine) is llama.cpp's "smollm", as in its converter's table."""
    with pytest.raises(QuantError, match="unknown BPE pre-tokenizer"):
        export_gguf(tied, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())
    smol = Path.home() / ".cache/weightops/smollm2-135m-instruct-bfloat16"
    if not (smol / "tokenizer.json").is_file():
        pytest.skip("no SmolLM2 tokenizer on this machine")
    from hashlib import sha256

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smol).encode(PROBE_TEXT)
    digest = sha256(str(ids).encode()).hexdigest()
    assert digest == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"


def test_refusals(tied, tmp_path):
    gpt2 = tiny_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(QuantError, match="not 'GPT2LMHeadModel'"):
        export_gguf(gpt2, tmp_path / "g.gguf")
    word_level = tiny_model(tmp_path / "wl", "llama")
    with pytest.raises(QuantError, match="not GPT-2 style byte-level BPE"):
        export_gguf(word_level, tmp_path / "w.gguf")
    with pytest.raises(QuantError, match="no tensor named"):
        export_gguf(tied, tmp_path / "x.gguf", q4_tensors={"model.layers.9.nope.weight"})
    with pytest.raises(QuantError, match="default type"):
        export_gguf(tied, tmp_path / "x.gguf", default="Q3_K")
    assert not list(tmp_path.glob("*.gguf*"))


def test_failure_leaves_no_file(tied, tmp_path):
    """A value beyond fp16 in a tensor kept as F16 stops the export without a half file."""
    folder = tmp_path / "big"
    folder.mkdir()
    for f in tied.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights_file = next(folder.glob("*.safetensors"))
    tensors = load_file(weights_file)
    tensors["model.embed_tokens.weight"][0, 0] = 1e6
    save_file(tensors, weights_file, metadata={"format": "pt"})
    out = tmp_path / "big.gguf"
    with pytest.raises(QuantError, match="fp16 range"):
        export_gguf(folder, out, pre_tokenizer="gpt-2")
    assert not out.exists() and not (tmp_path / "big.gguf.partial").exists()


def test_cli_prints_counts(tied, tmp_path):
    from typer.testing import CliRunner

    from weightops.cli import app

    out = tmp_path / "c.gguf"
    args = ["quantize", "gguf", str(tied), "-o", str(out), "--pre-tokenizer", "gpt-2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Q4_0 12, F32 5, Q2_K 2, F16 1" in result.output
    assert out.is_file()
