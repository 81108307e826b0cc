"""Tiny checkpoints built from transformers configs, for the demo and the tests.

Nothing can be downloaded, so examples are made here: a random model of a real
architecture (Llama, Qwen2, Gemma, GPT-2, …) saved as a normal Hugging Face folder
with a small byte-level tokenizer, plus "fine-tunes" that add seeded random task
vectors to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weightops.compat import causal_lm, causal_lm_from_config

_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(_DECODER, model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(_DECODER, model_type="qwen2", tie_word_embeddings=True),
    "gemma": dict(_DECODER, model_type="gemma", num_key_value_heads=1, head_dim=16),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=128),
    "granite": dict(_DECODER, model_type="granite", tie_word_embeddings=True),
    "mistral": dict(_DECODER, model_type="mistral", tie_word_embeddings=False),
}
VOCAB = 320


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # One token per character of the first 256 code points, whitespace included.
    vocab = {chr(i): i for i in range(256)}
    tok = Tokenizer(
        models.WordLevel(vocab={**vocab, "<unk>": 256, "<eos>": 257}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )
    fast.save_pretrained(folder)


def quiet_transformers() -> None:
    """Silence transformers' progress bars and info logs (weightops reports its own)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def tiny_model(
    folder: str | Path,
    family: str = "llama",
    *,
    seed: int = 0,
    layers: int | None = None,
    shard_size: str | int = "1GB",
    dtype: torch.dtype = torch.float32,
    vocab: int = VOCAB,
    tokenizer: bool = True,
    **config_overrides: Any,
) -> Path:
    """Save a random `family` model into `folder` (with a tokenizer unless
    `tokenizer=False`); return the folder. `config_overrides` replace entries of the
    family's config (e.g. hidden_size)."""
    from transformers import AutoConfig

    quiet_transformers()
    folder = Path(folder)
    cfg = dict(FAMILIES[family]) | config_overrides
    model_type = cfg.pop("model_type")
    if layers is not None:
        cfg["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **cfg)
    torch.manual_seed(seed)
    model = causal_lm_from_config(config, dtype)
    with torch.no_grad():
        for p in model.parameters():
            # Norm gains start at exactly 1 in a fresh model; perturb them so merges of
            # norms are tested on real numbers too.
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder, max_shard_size=shard_size)
    if tokenizer:
        _tokenizer(folder)
    return folder


def fine_tune(
    base: str | Path,
    folder: str | Path,
    *,
    seed: int,
    scale: float = 0.01,
    shard_size: str | int = "1GB",
) -> Path:
    """Save base + a seeded random task vector (dense noise plus a sparse strong part),
    with the base's tokenizer if it has one."""
    from transformers import AutoTokenizer

    quiet_transformers()
    model = causal_lm(base, "auto")  # keep the base's dtype on every transformers version
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            strong = (
                (torch.rand(p.shape, generator=g) < 0.05)
                * torch.randn(p.shape, generator=g)
                * 5
                * scale
            )
            p.add_((noise + strong).to(p.dtype))
    model.save_pretrained(folder, max_shard_size=shard_size)
    if any(Path(base).glob("tokenizer*")):
        AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return Path(folder)


def demo_models(root: str | Path, family: str = "llama") -> dict[str, Path]:
    """The demo family: a base and two fine-tunes under root/demo-models."""
    root = Path(root) / "demo-models"
    base = tiny_model(root / "base", family, seed=0, shard_size="100KB")
    return {
        "base": base,
        "ft_a": fine_tune(base, root / "ft_a", seed=1, shard_size="100KB"),
        "ft_b": fine_tune(base, root / "ft_b", seed=2, shard_size="100KB"),
    }
