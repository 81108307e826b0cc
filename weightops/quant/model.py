"""Quantizing a checkpoint folder, and running a transformers model on the result.

`quantize_model` streams the checkpoint tensor by tensor: every linear weight inside the
decoder blocks becomes a packed mixed 2/4-bit matrix (see weightops.quant.mixed);
embeddings, norms and lm_head stay in 16 bits. The output folder holds, for a weight
`X.weight`, the tensors `X.q2`, `X.q4`, `X.gmap`, `X.scale`, `X.zero` and `X.super`,
everything else unchanged, and `weightops_quant.json` (format version, settings and
per-tensor shapes) beside the usual config and tokenizer files.

`load(folder)` builds the model from its config, swaps each quantized
nn.Linear for a QuantLinear holding the packed tensors, and loads the rest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightops import kernels
from weightops.arch import describe, is_block_linear
from weightops.compat import causal_lm_from_config
from weightops.io.checkpoint import Checkpoint
from weightops.io.rewrite import Entry, ordered_names, staged_model, write_model
from weightops.io.safetensors_file import FileReader
from weightops.quant.job import QuantJob
from weightops.quant.mixed import Packed, QuantError, choose_k4, index_dtype

# Version 2 added the optional outlier parts; version 1 folders are version 2 folders
# without outliers, so both are read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "weightops_quant.json"


def part_shapes(
    out_f: int, in_f: int, group_size: int, k4: int, outliers: int = 0
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    g = in_f // group_size
    shapes = {
        "q2": ((out_f, (g - k4) * group_size // 16), torch.int32),
        "q4": ((out_f, k4 * group_size // 8), torch.int32),
        "gmap": ((out_f, math.ceil(g / 8)), torch.uint8),
        "scale": ((out_f, g), torch.uint8),
        "zero": ((out_f, g), torch.int8),
        "super": ((out_f, 2), torch.float16),
    }
    if outliers:
        shapes["oidx"] = ((out_f, outliers), index_dtype(in_f))
        shapes["oval"] = ((out_f, outliers), torch.float16)
    return shapes


def quantizable(ckpt: Checkpoint, name: str, group_size: int, lm_head: bool = False) -> bool:
    shape = ckpt.tensors[name].shape
    linear = is_block_linear(name, shape) or (lm_head and describe(name).role == "lm_head")
    return linear and len(shape) == 2 and shape[1] % group_size == 0


def check_supported(ckpt: Checkpoint) -> None:
    """Refuse, in one line, a model that would come out half-quantized or that `load`
    could not rebuild: quantization covers decoder language models whose every 2-D
    weight inside the blocks is a linear projection it recognises."""
    archs = [str(a) for a in ckpt.config.get("architectures") or []]
    model_type = ckpt.config.get("model_type", "?")
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise QuantError(
            f"{ckpt.path}: {', '.join(archs)} ({model_type}) is not a causal language model; "
            "weightops quantizes decoder LMs (…ForCausalLM) only"
        )
    unknown = [
        n
        for n, info in ckpt.tensors.items()
        if describe(n).layer is not None
        and n.endswith(".weight")
        and len(info.shape) == 2
        and not is_block_linear(n, info.shape)
        and describe(n).role not in ("embed", "pos_embed")
    ]
    if unknown:
        raise QuantError(
            f"{ckpt.path}: {len(unknown)} block weights of this {model_type} model are not "
            f"linear projections weightops recognises (e.g. {unknown[0]}); quantizing the "
            "others would leave it half-quantized"
        )


def quantize_model(
    model: str | Path,
    out: str | Path,
    *,
    group_size: int = 64,
    avg_bits: float = 2.85,
    bits: int = 2,
    calib: str | Path | None = None,
    outliers: float = 0.0,
    lm_head: bool = False,
    keep_dtype: torch.dtype | None = torch.bfloat16,
    force: bool = False,
    shard_size: int = 5 * 10**9,
    executor: str = "local",
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Write the quantized checkpoint; return the manifest (with the exact bits).

    bits 2: 2-bit groups with 4-bit ones up to `avg_bits`; bits 4: every group 4-bit.
    calib: text or JSONL; its activations' Hessian per layer drives GPTQ-style code
      choice and weighs each input's error (see calibrate and mixed).
    outliers: share of each row's weights kept exactly as fp16 outliers (0 … 0.05).
    lm_head: quantize an untied lm_head too (it stays 16-bit by default).
    keep_dtype: the dtype of the float tensors that are not quantized (None: as stored).
    executor: "local", or "ray" for one Ray task per decoder block (weightops.quant.ray_exec)."""
    if bits not in (2, 4):
        raise QuantError(f"--bits {bits}: groups are 2-bit (with 4-bit ones) or all 4-bit")
    if group_size <= 0 or group_size % 16:
        raise QuantError(
            f"group size {group_size} must be a positive multiple of 16 (whole packed words)"
        )
    if not 0 <= outliers <= 0.05:
        raise QuantError(f"--outliers {outliers}: give a share of each row between 0 and 0.05")
    ckpt = Checkpoint(model)
    if (ckpt.folder / MANIFEST).exists() or any(n.endswith(".q2") for n in ckpt.tensors):
        raise QuantError(f"{ckpt.path}: this model is already quantized by weightops")
    if str(ckpt.config.get("model_type")) == "gpt2":
        raise QuantError("GPT-2 stores its linears as Conv1D ([in, out]); not supported yet")
    check_supported(ckpt)
    plan: dict[str, tuple[int, int]] = {}  # weight name -> (k4, outliers per row)
    # Blocks in increasing order, so calibration can walk through the model once.
    names = sorted(ordered_names(ckpt), key=lambda n: _layer(n))
    for name in names:
        if quantizable(ckpt, name, group_size, lm_head):
            in_f = ckpt.tensors[name].shape[1]
            n_out = round(outliers * in_f)
            k4 = in_f // group_size if bits == 4 else choose_k4(in_f, group_size, avg_bits, n_out)
            plan[name] = (k4, n_out)
    if not plan:
        raise QuantError(
            f"{ckpt.path}: no linear weight whose inputs the group size {group_size} divides"
        )
    texts = None
    token_weights = None
    if calib is not None:
        from weightops.quant.calibrate import read_texts

        texts = read_texts(calib)
        if bits == 2:
            from weightops.quant.allocate import calibrated_plan

            plan, token_weights = calibrated_plan(ckpt, texts, plan, group_size, avg_bits)
    entries: list[Entry] = []
    for name in names:
        info = ckpt.tensors[name]
        if name in plan:
            prefix = name[: -len("weight")]
            entries += [
                (prefix + part, shape, dtype)
                for part, (shape, dtype) in part_shapes(
                    *info.shape, group_size, *plan[name]
                ).items()
            ]
        else:
            dtype = (
                keep_dtype
                if keep_dtype is not None and info.dtype.is_floating_point
                else info.dtype
            )
            entries.append((name, info.shape, dtype))
    stats: dict[str, dict[str, Any]] = {}
    q_bits = sum(part_bits(ckpt.tensors[n].shape, group_size, *kn) for n, kn in plan.items())
    q_weights = sum(math.prod(ckpt.tensors[n].shape) for n in plan)
    manifest: dict[str, Any] = {
        "format": "weightops-mixed-2-4",
        "version": FORMAT_VERSION,
        "group_size": group_size,
        "avg_bits_target": avg_bits if bits == 2 else None,
        "calibrated": calib is not None,
        "outliers": outliers,
        "bits": bits,
        "quantized_bits_per_weight": q_bits / q_weights,
        "tensors": stats,
    }
    settings = {k: manifest[k] for k in ("format", "version", "group_size", "avg_bits_target")}
    summary = [
        f"Linear weights of the decoder blocks quantized to mixed 2/4-bit groups of {group_size} "
        f"({q_bits / q_weights:.3f} bits per quantized weight, scales and maps included); "
        "embeddings, norms and lm_head in 16 bits. Load with `weightops.quant.load`."
    ]
    staging: dict[str, Any] = {
        "title": f"{ckpt.path.name}, 2/4-bit",
        "summary": summary,
        "settings": settings,
        "tag": "quantization",
        "force": force,
        "shard_size": shard_size,
        "extra_files": {MANIFEST: lambda: json.dumps(manifest, indent=2) + "\n"},
    }
    job = QuantJob(ckpt, names, plan, group_size, texts, token_weights)
    if executor == "ray":
        _quantize_on_ray(job, Path(out), entries, staging, stats, ray_address)
    elif executor == "local":
        with job.producer(stats) as produce:
            write_model(ckpt, Path(out), entries, produce, **staging)
    else:
        raise QuantError(f"--executor {executor}: unknown executor", hint="use local or ray")
    return manifest


def _quantize_on_ray(
    job: QuantJob,
    out: Path,
    entries: list[Entry],
    staging: dict[str, Any],
    stats: dict[str, dict[str, Any]],
    address: str | None,
) -> None:
    try:
        from weightops.quant.ray_exec import quantize_on_ray
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != "ray":
            raise
        raise QuantError(
            "--executor ray: Ray is not installed", hint="pip install 'weightops[ray]'"
        ) from None
    with staged_model(job.ckpt, out, entries, **staging) as staged:
        # The cluster's work is not watched as it goes: a bad side file fails it before.
        staged.side_files.result()
        stats.update(quantize_on_ray(job, staged.path, staged.layout, entries, out, address))


def _layer(name: str) -> int:
    layer = describe(name).layer
    return -1 if layer is None else layer


def part_bits(shape: tuple[int, ...], group_size: int, k4: int, outliers: int = 0) -> int:
    out_f, in_f = shape
    return sum(
        math.prod(s) * torch.empty((), dtype=d).element_size() * 8
        for s, d in part_shapes(out_f, in_f, group_size, k4, outliers).values()
    )


class QuantLinear(nn.Module):
    """A linear layer running on packed mixed 2/4-bit weights, through
    `weightops.kernels.quant_matmul`: the fused dequantize + GEMV kernel on CUDA with
    cupy, the weight dequantized on the fly for each forward elsewhere."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        k4: int,
        bias: bool,
        outliers: int = 0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.k4 = group_size, k4
        self.parts = part_shapes(out_features, in_features, group_size, k4, outliers)
        for part, (shape, dtype) in self.parts.items():
            self.register_buffer(part, torch.zeros(shape, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def packed(self) -> Packed:
        return Packed(
            (self.out_features, self.in_features),
            self.group_size,
            self.k4,
            **{p: getattr(self, p) for p in self.parts},
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.quant_matmul(x, self.packed())
        return y if self.bias is None else y + self.bias


def load(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM running on the quantized weights of `folder`."""
    from transformers import AutoConfig

    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise QuantError(f"{folder}: no {MANIFEST}; not a weightops-quantized model")
    from weightops.io.safe_read import load_json

    manifest = load_json(manifest_path, MANIFEST, error=QuantError)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), dict):
        raise QuantError(f"{manifest_path}: not a weightops quantization manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise QuantError(
            f"{folder}: quantized format version {manifest.get('version')} "
            f"(this weightops reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    try:
        config = AutoConfig.from_pretrained(folder)
        # Built on the CPU (not the meta device) so buffers the checkpoint does not hold,
        # such as rotary frequencies, are initialised as usual.
        model = causal_lm_from_config(config, dtype)
    except (OSError, ValueError, KeyError) as e:
        raise QuantError(f"{folder}: cannot build a causal LM from its config.json ({e})") from e
    try:
        group_size = int(manifest["group_size"])
        for weight_name, info in manifest["tensors"].items():
            parent_name, _, child = weight_name[: -len(".weight")].rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            out_f, in_f = info["shape"]
            quant = QuantLinear(
                in_f, out_f, group_size, info["k4"], old.bias is not None, info.get("outliers", 0)
            )
            setattr(parent, child, quant)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise QuantError(
            f"{folder}: {MANIFEST} does not describe this model's layers ({type(e).__name__}: {e})"
        ) from e
    ckpt = Checkpoint(folder)
    with FileReader() as reader:
        state = {name: reader.read(info) for name, info in ckpt.tensors.items()}
    result = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [n for n in result.missing_keys if not (tied and n.endswith("lm_head.weight"))]
    if missing or result.unexpected_keys:
        raise QuantError(
            f"{folder}: checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if tied:
        model.tie_weights()
    return model.eval()
