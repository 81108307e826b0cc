"""`weightops inspect`: what is in a checkpoint, from its headers alone."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import typer

from weightops.cli._common import user_errors


def describe_checkpoint(path: Path) -> dict:
    from weightops.arch import describe, family, num_layers
    from weightops.io.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    roles: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    dtypes: Counter[str] = Counter()
    shards: Counter[str] = Counter()
    for info in ckpt.tensors.values():
        r = roles[describe(info.name).role]
        r["tensors"] += 1
        r["params"] += info.numel
        r["bytes"] += info.nbytes
        dtypes[str(info.dtype).removeprefix("torch.")] += info.numel
        shards[info.path.name] += info.nbytes
    cfg = ckpt.config
    return {
        "path": str(path),
        "family": family(cfg),
        "architectures": cfg.get("architectures", []),
        "layers": num_layers(cfg, ckpt.tensors),
        "parameters": sum(i.numel for i in ckpt.tensors.values()),
        "tensors": len(ckpt.tensors),
        "bytes": ckpt.nbytes,
        "tied_embeddings": bool(ckpt.aliases),
        "dtypes": dict(dtypes),
        "roles": dict(sorted(roles.items())),
        "shards": dict(shards),
        "metadata": ckpt.metadata,
    }


def inspect(
    model: Path = typer.Argument(
        ..., help="Model folder or .safetensors file.", show_default=False
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Show a checkpoint's architecture, parameter count, dtypes, tensors and size per
    role (embeddings, attention, MLP, norms, …) and its shards. Reads headers only."""
    with user_errors():
        d = describe_checkpoint(model)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    echo = typer.echo
    arch = ", ".join(d["architectures"]) or "?"
    echo(f"{d['path']}: {d['family']} ({arch}), {d['layers']} layers")
    echo(f"parameters  {d['parameters']:,} ({d['bytes'] / 1e9:.3f} GB in {d['tensors']} tensors)")
    echo("dtypes      " + ", ".join(f"{k} {v:,}" for k, v in d["dtypes"].items()))
    if d["tied_embeddings"]:
        echo("lm_head     tied to the input embeddings")
    echo("")
    echo(f"{'role':<14}{'tensors':>8}{'params':>16}{'MB':>12}")
    for role, r in d["roles"].items():
        echo(f"{role:<14}{r['tensors']:>8}{r['params']:>16,}{r['bytes'] / 1e6:>12.2f}")
    echo("")
    for name, size in d["shards"].items():
        echo(f"shard  {name}  {size / 1e6:.2f} MB")


def register(app: typer.Typer) -> None:
    app.command()(inspect)
