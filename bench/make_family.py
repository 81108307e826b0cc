"""Write a synthetic family of Llama-shaped bf16 checkpoints for merge benchmarks.

The family is one random base model plus three fine-tunes, each the base plus a
different sparse, heavy-tailed delta, which is the structure TIES-style methods
are designed around. Tensors are written directly with safetensors because
instantiating a transformers model would dominate the runtime.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

HIDDEN = 768
INTERMEDIATE = 2048
HEADS = 12
KV_HEADS = 4
VOCAB = 32000
HEAD_DIM = HIDDEN // HEADS
FINE_TUNES = ("ft_a", "ft_b", "ft_c")


def llama_config(n_layers: int) -> LlamaConfig:
    # architectures is required by tools that dispatch on it (mergekit among them).
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=n_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def tensor_shapes(n_layers: int) -> dict[str, tuple[int, ...]]:
    """HF Llama tensor names and shapes, in checkpoint order."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    kv = KV_HEADS * HEAD_DIM
    for i in range(n_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv, HIDDEN)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv, HIDDEN)
        shapes[f"{p}.self_attn.o_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}.mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}.mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[f"{p}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def base_tensor(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm gains start at one
        return torch.ones(shape)
    return torch.randn(shape, generator=gen) * 0.02


def delta(shape: tuple[int, ...], gen: torch.Generator, changed: float = 0.3) -> torch.Tensor:
    """Heavy-tailed update: small noise on a `changed` share of entries plus rare large ones."""
    d = torch.randn(shape, generator=gen) * 0.002
    d *= torch.rand(shape, generator=gen) < changed
    outliers = torch.rand(shape, generator=gen) < 1e-3
    d += outliers * torch.randn(shape, generator=gen) * 0.02
    return d


def write_checkpoint(out: Path, config: LlamaConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write config plus two safetensors shards and the HF shard index."""
    out.mkdir(parents=True, exist_ok=True)
    config.to_json_file(out / "config.json")
    names = list(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    # Split where the running byte count first reaches half, so both shards are non-empty.
    running, cut = 0, len(names) - 1
    for idx, size in enumerate(sizes):
        running += size
        if running >= total / 2:
            cut = min(idx + 1, len(names) - 1)
            break
    shards = {
        "model-00001-of-00002.safetensors": names[:cut],
        "model-00002-of-00002.safetensors": names[cut:],
    }
    weight_map: dict[str, str] = {}
    for fname, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_family(
    root: Path, n_layers: int = 16, seed: int = 0, changed: float = 0.3
) -> dict[str, Path]:
    """Write base, ft_a, ft_b, ft_c under root and return their directories by name."""
    config = llama_config(n_layers)
    shapes = tensor_shapes(n_layers)
    base_gen = torch.Generator().manual_seed(seed)
    # Fine-tunes are derived from the bf16-rounded base, as a real fine-tune would start from it.
    base = {n: base_tensor(s, base_gen).to(torch.bfloat16) for n, s in shapes.items()}
    paths = {"base": root / "base"}
    write_checkpoint(paths["base"], config, base)
    for k, name in enumerate(FINE_TUNES, start=1):
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        ft = {
            n: (base[n].float() + delta(s, gen, changed)).to(torch.bfloat16)
            for n, s in shapes.items()
        }
        paths[name] = root / name
        write_checkpoint(paths[name], config, ft)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--changed", type=float, default=0.3, help="share of entries each fine-tune changes"
    )
    args = parser.parse_args()
    for name, path in make_family(args.root, args.layers, args.seed, args.changed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
