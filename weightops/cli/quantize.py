"""`weightops quantize`: mixed 2/4-bit quantization of a checkpoint, and its evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from typer.core import TyperGroup

from weightops.cli import _common
from weightops.cli._common import parse_size, user_errors


class _RunByDefault(TyperGroup):
    """`weightops quantize MODEL -o OUT` runs the quantizer; `weightops quantize eval …`
    the evaluation: anything that is not a subcommand name goes to `run`."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


quantize_app = typer.Typer(
    cls=_RunByDefault,
    help="Mixed 2/4-bit quantization: `weightops quantize MODEL -o OUT`, "
    "`weightops quantize eval MODEL OUT --text eval.txt`, "
    "`weightops quantize gguf MODEL -o OUT.gguf`.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@quantize_app.command("run")
def run(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model folder.", show_default=False),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    group_size: int = typer.Option(
        64, "--group-size", help="Inputs per quantization group (multiple of 16)."
    ),
    avg_bits: float = typer.Option(
        2.85, "--avg-bits", help="Budget in bits per weight, everything counted."
    ),
    calib: Path | None = typer.Option(
        None,
        "--calib",
        help="Text or JSONL (text/prompt) to calibrate on: codes are then chosen to "
        "minimise each layer's output error on its activations (GPTQ-style), not the "
        "weight error alone, and each matrix gets the share of 4-bit groups that lowers "
        "the loss most within the budget.",
    ),
    outliers: float = typer.Option(
        0.0,
        "--outliers",
        help="Share of each row's weights kept exactly in fp16 (e.g. 0.004); they no "
        "longer widen their group's range. Counted in the bits.",
    ),
    lm_head: bool = typer.Option(False, "--lm-head", help="Quantize an untied lm_head too."),
    keep: str = typer.Option(
        "bfloat16",
        "--keep-dtype",
        help="bfloat16, float16 or same: dtype of the tensors kept unquantized.",
    ),
    bits: int = typer.Option(
        2, "--bits", help="2: 2-bit groups plus 4-bit ones within --avg-bits; 4: all 4-bit."
    ),
    threads: int | None = _common.THREADS,
    force: bool = _common.FORCE,
    shard_size: str = _common.SHARD_SIZE,
    executor: str = _common.EXECUTOR,
    ray_address: str | None = _common.RAY_ADDRESS,
) -> None:
    """Quantize every linear weight of the decoder blocks to 2-bit groups, the groups
    that gain most from it to 4 bits (the same number in every row), within the
    average bit budget; embeddings, norms and lm_head stay 16-bit.

    Without --calib or --outliers the passes over the weights run in C, compiled on first use with
    the system's C compiler (cc, or $CC) into ~/.cache/weightops/native; without one,
    or with WEIGHTOPS_NATIVE=0, they run in torch, about twice as slow."""
    size = parse_size(shard_size)
    with user_errors():
        from weightops.quant.model import quantize_model
        from weightops.threads import intra_op_threads

        with intra_op_threads(threads):
            manifest = quantize_model(
                model,
                output,
                group_size=group_size,
                avg_bits=avg_bits,
                bits=bits,
                calib=calib,
                outliers=outliers,
                lm_head=lm_head,
                keep_dtype=_keep_dtype(keep),
                force=force,
                shard_size=size,
                executor=executor,
                ray_address=ray_address,
            )
        typer.echo(
            f"wrote {output}: {manifest['quantized_bits_per_weight']:.3f} bits per quantized weight "
            f"over {len(manifest['tensors'])} matrices",
            err=True,
        )


def _keep_dtype(name: str):  # type: ignore[no-untyped-def]
    import torch

    from weightops.quant.mixed import QuantError

    choices = {"bfloat16": torch.bfloat16, "float16": torch.float16, "same": None}
    if name not in choices:
        raise QuantError(f"--keep-dtype {name!r}: choose bfloat16, float16 or same")
    return choices[name]


@quantize_app.command("eval")
def evaluate(
    model: Path = typer.Argument(
        ..., metavar="MODEL", help="The original model folder.", show_default=False
    ),
    quantized: Path = typer.Argument(
        ..., metavar="OUT", help="Its quantized folder.", show_default=False
    ),
    text: Path = typer.Option(..., "--text", help="Plain text to measure perplexity on."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Tokens of the text to use."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Perplexity of both models on TEXT, bits per weight, and the relative error of
    every quantized matrix."""
    with user_errors():
        from weightops.quant.evaluate import evaluate as run_eval

        report = run_eval(model, quantized, text, max_tokens=max_tokens)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(
        f"perplexity   original {report['perplexity_original']:.3f}   quantized {report['perplexity_quantized']:.3f}"
    )
    typer.echo(
        f"bits/weight  {report['bits_per_weight']:.3f} (quantized matrices, scales and maps included)"
    )
    typer.echo(f"tokens       {report['tokens']}")
    for name, err in sorted(report["rel_error"].items()):
        typer.echo(f"  {err:7.4f}  {name}")
    if not math.isfinite(report["perplexity_quantized"]):
        raise typer.Exit(1)


@quantize_app.command("gguf")
def gguf_export(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model folder.", show_default=False),
    output: Path = typer.Option(..., "-o", "--output", help="Output .gguf file."),
    qtype: str = typer.Option(
        "Q2_K",
        "--type",
        help="Q2_K or Q4_K for the block linears (rows not a multiple of 256 take "
        "llama.cpp's fallback: Q4_0 or Q5_0).",
    ),
    q4: list[str] = typer.Option(
        [], "--q4", help="A tensor (checkpoint name) to write as Q4_K (repeatable)."
    ),
    pre_tokenizer: str | None = typer.Option(
        None,
        "--pre-tokenizer",
        help="llama.cpp's pre-tokenizer name (e.g. llama-bpe, qwen2, smollm), for a "
        "vocabulary it does not recognise.",
    ),
) -> None:
    """Export a Llama, Mistral or Qwen2 model to a GGUF file that llama.cpp runs as it
    is: llama.cpp's tensor names and metadata, the tokenizer and chat template, every
    block linear in a GGML k-quant (or llama.cpp's fallback type), norms F32, embeddings
    F16. Weights are re-quantized from the float checkpoint."""
    with user_errors():
        from weightops.quant.gguf_export import export_gguf

        report = export_gguf(
            model, output, q4_tensors=q4, default=qtype, pre_tokenizer=pre_tokenizer
        )
        counts = ", ".join(
            f"{t} {n}" for t, n in sorted(report["counts"].items(), key=lambda kv: -kv[1])
        )
        typer.echo(
            f"wrote {output}: {report['bits_per_weight']:.3f} bits per quantized weight; "
            f"tensors {counts}",
            err=True,
        )


def register(app: typer.Typer) -> None:
    app.add_typer(quantize_app, name="quantize")
