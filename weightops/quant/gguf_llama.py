"""What makes a GGUF file a model llama.cpp runs: its architecture, tensor names,
Q/K row order, hyper-parameters and tokenizer, written as llama.cpp's own converter
(convert_hf_to_gguf.py) writes them for the Llama family.

Architectures. LlamaForCausalLM and MistralForCausalLM become llama.cpp's `llama`,
Qwen2ForCausalLM its `qwen2`; anything else is refused, as is a RoPE scaling other than
none or linear (Llama 3.1's `llama3` scaling needs a generated rope_freqs tensor).

Names. Tensors take llama.cpp's names through the `gguf` package's own map
(token_embd, blk.N.attn_q, …, output_norm, output). A tied lm_head is not written: with
no `output` tensor llama.cpp reuses token_embd, as for any tied model.

Q/K rows. Hugging Face's Llama rotates the two halves of each head (rotate_half);
llama.cpp's `llama` architecture rotates adjacent pairs. The converter therefore
reorders the rows of q_proj and k_proj (weights and biases) per head: head h's rows
[first half | second half] become interleaved, row 2i from the first half and row 2i+1
from the second — `permute` below, with K using the key/value head count. Qwen2 runs
with llama.cpp's NeoX-style RoPE and keeps its rows.

Tokenizer. GPT-2 style byte-level BPE (tokenizer.json) is written as the converter
writes it: `tokenizer.ggml.model` gpt2, every id's token text and type (normal, control
for special added tokens, user-defined for other added tokens, unused for ids the
vocabulary does not fill), merges, bos/eos/unk/pad ids, add_bos/add_eos and the chat
template (tokenizer_config.json or chat_template.jinja, read by the `gguf` package's
SpecialVocab). `tokenizer.ggml.pre` names the pre-tokenizer llama.cpp must apply; the
converter identifies it by encoding a fixed probe text and hashing the token ids, and
the same probe and the hashes of the vocabularies listed in PRE_TOKENIZERS are used
here. SentencePiece vocabularies are refused.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from weightops.arch import text_config
from weightops.quant.mixed import QuantError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# The converter's probe text: its token ids, hashed, identify the pre-tokenizer.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256 of str(token ids of PROBE_TEXT) -> llama.cpp's pre-tokenizer name (the
# converter's table, for the vocabularies of the families exported here).
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}


def llama_cpp_arch(config: dict[str, Any], where: Path) -> str:
    """llama.cpp's architecture name for a checkpoint config, or a one-line refusal."""
    archs = config.get("architectures") or []
    arch = ARCHITECTURES.get(archs[0]) if archs else _MODEL_TYPES.get(config.get("model_type"))
    if arch is None:
        got = archs[0] if archs else config.get("model_type")
        raise QuantError(
            f"{where}: GGUF export writes Llama, Mistral and Qwen2 models for llama.cpp, "
            f"not {got!r}",
            hint="quantize it with `weightops quantize MODEL -o OUT` instead",
        )
    scaling = text_config(config).get("rope_scaling")
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if scaling and kind not in ("linear", "default"):
        raise QuantError(f"{where}: RoPE scaling {kind!r} is not written to GGUF yet")
    return arch


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection (or its bias) from rotate-half to llama.cpp's pair order."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads(config: dict[str, Any]) -> tuple[int, int]:
    cfg = text_config(config)
    n_head = int(cfg["num_attention_heads"])
    return n_head, int(cfg.get("num_key_value_heads") or n_head)


def qk_heads(hf_name: str, arch: str, config: dict[str, Any]) -> int | None:
    """Head count to `permute` a tensor's rows by, None when it keeps its rows."""
    if arch != "llama":
        return None
    n_head, n_kv = heads(config)
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return n_kv
    return None


def gguf_names(
    names: list[str], arch: str, config: dict[str, Any], where: Path
) -> dict[str, str | None]:
    """Checkpoint name -> llama.cpp name, None for tensors not written (a tied lm_head,
    rotary caches)."""
    import gguf

    cfg = text_config(config)
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    table = gguf.get_tensor_name_map(model_arch, int(cfg["num_hidden_layers"]))
    tied = bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    out: dict[str, str | None] = {}
    for name in names:
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            out[name] = None
            continue
        new = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise QuantError(f"{where}: tensor {name!r} has no llama.cpp {arch} name")
        out[name] = new
    return out


def _rope_theta(cfg: dict[str, Any]) -> float | None:
    theta = cfg.get("rope_theta")
    params = cfg.get("rope_parameters")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return None if theta is None else float(theta)


def add_hparams(writer: Any, config: dict[str, Any], name: str, file_type: int) -> None:
    """general.* and `{arch}.*` keys, as the converter's TextModel and LlamaModel write them."""
    cfg = text_config(config)
    n_head, n_kv = heads(config)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if (theta := _rope_theta(cfg)) is not None:
        writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if cfg.get("head_dim"):
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_file_type(file_type)
    writer.add_vocab_size(int(cfg["vocab_size"]))
    writer.add_rope_dimension_count(int(head_dim))
    scaling = cfg.get("rope_scaling") or {}
    if (scaling.get("rope_type") or scaling.get("type")) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_quantization_version(2)


def _check_byte_level_bpe(folder: Path) -> None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise QuantError(f"{folder}: no tokenizer.json; GGUF export writes a BPE vocabulary")
    model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (folder / "tokenizer.model").exists()
    ):
        raise QuantError(
            f"{folder}: the tokenizer is not GPT-2 style byte-level BPE; SentencePiece "
            "vocabularies are not written to GGUF yet"
        )


def pre_tokenizer_name(tokenizer: Any, folder: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a Hugging Face tokenizer, by the probe hash."""
    digest = sha256(str(tokenizer.encode(PROBE_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise QuantError(
            f"{folder}: unknown BPE pre-tokenizer (probe hash {digest[:12]}…)",
            hint="name llama.cpp's pre-tokenizer with --pre-tokenizer (e.g. llama-bpe, qwen2, gpt-2)",
        )
    return PRE_TOKENIZERS[digest]


def _looks_special(text: str) -> bool:
    """Added tokens the converter types as control although not marked special."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def add_tokenizer(writer: Any, folder: Path, vocab_size: int, pre: str | None) -> str:
    """Write the GPT-2 style vocabulary; returns the pre-tokenizer name written."""
    import gguf
    from transformers import AutoTokenizer

    _check_byte_level_bpe(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    pre = pre or pre_tokenizer_name(tok, folder)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise QuantError(f"{folder}: the tokenizer has ids beyond vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if text in added:
            special = tok.added_tokens_decoder[i].special or _looks_special(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise QuantError(f"{folder}: tokenizer.json has no BPE merges")
    special.add_to_gguf(writer, quiet=True)
    return pre
