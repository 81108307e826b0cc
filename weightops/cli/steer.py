"""`weightops steer`: extract steering vectors, and bake them into checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from weightops.cli import _common
from weightops.cli._common import parse_size, user_errors

steer_app = typer.Typer(
    help="Steering vectors: extract from contrastive pairs, bake into weights.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """JSONL of {"positive": …, "negative": …}; errors name the line."""
    from weightops.io.jsonl import JsonlError, read_jsonl
    from weightops.steering import SteeringError

    try:
        rows = read_jsonl(path, what="pairs")
    except JsonlError as e:
        raise SteeringError(str(e)) from e
    pairs = []
    for n, row in rows:
        pair = (row.get("positive"), row.get("negative"))
        if not all(isinstance(t, str) for t in pair):
            raise SteeringError(
                f"{path}:{n}: expected a JSON object with 'positive' and 'negative' texts"
            )
        pairs.append(pair)
    if not pairs:
        raise SteeringError(f"{path}: no pairs (the file is empty)")
    return pairs  # type: ignore[return-value]


def _chosen_layers(layers: str, gguf: bool) -> list[int] | None:
    """--layers as numbers (None for all / auto), checked before any model is loaded."""
    from weightops.steering import SteeringError

    if layers in ("all", "auto"):
        return None
    try:
        chosen = [int(x) for x in layers.split(",")]
    except ValueError:
        raise SteeringError(
            f"--layers {layers!r}: give all, auto or numbers like 8,10,12"
        ) from None
    if gguf and 0 in chosen:
        raise SteeringError(
            "--layers includes 0, but a llama.cpp control vector (.gguf) cannot hold layer 0",
            hint="drop 0 from --layers, or write a .safetensors vector",
        )
    return chosen


def _as_chat(tok, texts: list[str]) -> list[str]:
    """Each text as a user turn, ending with the template's assistant header: the
    state is read at the last token before the model would answer."""
    from weightops.steering import SteeringError

    if not getattr(tok, "chat_template", None):
        raise SteeringError(
            "--chat-template: the model's tokenizer has no chat template",
            hint="leave out --chat-template, or write the prompts in the model's format",
        )
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
        )
        for t in texts
    ]


@steer_app.command("train")
def train(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model folder.", show_default=False),
    pairs: Path = typer.Option(..., "--pairs", help='JSONL of {"positive": …, "negative": …}.'),
    output: Path = typer.Option(
        ...,
        "-o",
        "--output",
        help="Vector file: .safetensors, or .gguf for llama.cpp (layers 1 and up only).",
    ),
    method: str = typer.Option(
        "pca_diff", "--method", help="mean_diff, pca_diff, pca_center or probe."
    ),
    layers: str = typer.Option(
        "all",
        "--layers",
        help="all, auto (rank layers by 5-fold cross-validated pair accuracy), or e.g. 8,10,12.",
    ),
    top: int = typer.Option(
        1, "--top", min=1, help="With --layers auto: how many of the best layers to keep."
    ),
    chat_template: bool = typer.Option(
        False,
        "--chat-template",
        help="Wrap each text as a user message in the model's chat template (read at the "
        "end of the assistant header), as for instruct models.",
    ),
    position: int = typer.Option(
        -1,
        "--position",
        help="Token of each text to read the state at, counted from the end: -1 the last, "
        "-2 the one before (with --chat-template: a token of the assistant header). Not "
        "with --layers auto.",
    ),
) -> None:
    """Extract a steering vector from contrastive text pairs (read at the last token)."""
    with user_errors():
        from weightops.steering import SteeringError, SteeringVector
        from weightops.steering.extract import METHODS, search_layers

        gguf = output.suffix == ".gguf"
        if method not in METHODS:
            raise SteeringError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
        if output.suffix not in (".gguf", ".safetensors"):
            raise SteeringError(f"-o {output}: the vector file must end in .safetensors or .gguf")
        if not output.parent.is_dir():
            raise SteeringError(f"-o {output}: the folder {output.parent} does not exist")
        if position >= 0:
            raise SteeringError(
                f"--position {position}: count from the end of each text (-1 is the last token)"
            )
        if position != -1 and layers == "auto":
            raise SteeringError(
                "--position with --layers auto: the layer search reads the last token",
                hint="give the layers (e.g. --layers all) with --position",
            )
        chosen = _chosen_layers(layers, gguf)
        data = read_pairs(pairs)
        import torch
        from transformers import AutoTokenizer

        from weightops.compat import causal_lm
        from weightops.demo import quiet_transformers
        from weightops.io.checkpoint import Checkpoint

        quiet_transformers()
        Checkpoint(model)  # refuses pickled weights before transformers could unpickle them
        # fp32 whatever the checkpoint stores: transformers 5 would otherwise run a bf16
        # checkpoint in bf16, and the means of its states would carry bf16 rounding.
        m = causal_lm(model, torch.float32)
        tok = AutoTokenizer.from_pretrained(model)
        if chat_template:
            flat = _as_chat(tok, [t for p in data for t in p])
            data = list(zip(flat[0::2], flat[1::2], strict=True))
        info: dict = {}
        if layers == "auto":
            ranking = search_layers(m, tok, data, method)
            for sc in ranking:
                typer.echo(
                    f"layer {sc.layer:3d}  held-out accuracy {sc.accuracy:.3f}  "
                    f"margin {sc.margin:.2f}",
                    err=True,
                )
            usable = [sc for sc in ranking if not (gguf and sc.layer == 0)]
            chosen = sorted(sc.layer for sc in usable[:top])
            info["ranking"] = [sc.layer for sc in usable]
        elif chosen is None and gguf:
            from weightops.steering import find_layers

            chosen = list(range(1, len(find_layers(m).blocks)))
        at = None if position == -1 else [(position, position)] * len(data)
        vec = SteeringVector.train(m, tok, data, method=method, layers=chosen, positions=at)
        vec.info.update(info, chat_template=chat_template, position=position)
        if gguf:
            vec.export_gguf(output)
        else:
            vec.save(output)
        typer.echo(f"wrote {output} ({method}, layers {vec.layers})", err=True)


DTYPE = typer.Option(
    "source",
    "--dtype",
    help="Output dtype of the floating-point tensors: source (as the input model), float32, "
    "bfloat16 or float16. In bf16 the edited weights are rounded to bf16, so the output's "
    "logits differ from the hooked model's by that rounding; float32 keeps them exact.",
)


def _dtype(name: str):
    import torch

    from weightops.steering import SteeringError

    choices = {"source": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
    choices["float16"] = torch.float16
    if name not in choices:
        raise SteeringError(f"--dtype {name!r}: choose one of {', '.join(choices)}")
    return choices[name]


def _load(vector: Path):
    from weightops.steering import SteeringVector

    return SteeringVector.load(vector)


@steer_app.command("bake")
def bake(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model folder.", show_default=False),
    vector: Path = typer.Option(..., "--vector", help="Steering vector (.safetensors or .gguf)."),
    strength: float = typer.Option(..., "--strength", help="Multiplier of the vector."),
    output: Path = typer.Option(..., "-o", "--output", help="Output model folder."),
    dtype: str = DTYPE,
    force: bool = _common.FORCE,
    shard_size: str = _common.SHARD_SIZE,
) -> None:
    """Bake `strength × vector` into the weights as an addition at every position (a
    bias on each steered block's MLP output projection). The output is an ordinary
    checkpoint that gives the same logits as the hooked model."""
    size = parse_size(shard_size)
    with user_errors():
        from weightops.steering.bake import bake_addition

        bake_addition(
            model,
            _load(vector),
            strength,
            output,
            dtype=_dtype(dtype),
            force=force,
            shard_size=size,
        )
        typer.echo(f"wrote {output}", err=True)


@steer_app.command("ablate")
def ablate(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model folder.", show_default=False),
    vector: Path = typer.Option(..., "--vector", help="Vector holding the direction to remove."),
    output: Path = typer.Option(..., "-o", "--output", help="Output model folder."),
    layer: int | None = typer.Option(
        None,
        "--layer",
        help="Which layer's direction, if the vector has several (default: the best layer "
        "of `steer train --layers auto`).",
    ),
    dtype: str = DTYPE,
    force: bool = _common.FORCE,
    shard_size: str = _common.SHARD_SIZE,
) -> None:
    """Remove a direction from the model (e.g. a refusal direction) by orthogonalising
    every matrix that writes to the residual stream against it."""
    size = parse_size(shard_size)
    with user_errors():
        from weightops.steering.bake import bake_ablation

        vec = _load(vector)
        if layer is None and len(vec.layers) > 1:
            ranked = [i for i in vec.info.get("ranking", []) if i in vec.directions]
            if not ranked:
                from weightops.steering import SteeringError

                raise SteeringError(
                    f"{vector} has directions for layers {vec.layers}: say which to remove",
                    hint="add --layer N, or train the vector with --layers auto",
                )
            layer = ranked[0]
            typer.echo(f"using the direction of layer {layer} (best ranked)", err=True)
        bake_ablation(
            model, vec, output, layer=layer, dtype=_dtype(dtype), force=force, shard_size=size
        )
        typer.echo(f"wrote {output}", err=True)


def register(app: typer.Typer) -> None:
    from weightops.cli import steer_optimize  # noqa: F401  (adds `steer optimize`)

    app.add_typer(steer_app, name="steer")
