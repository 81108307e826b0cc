"""Export a Llama-family checkpoint to a GGUF file that llama.cpp runs as it is.

The file is laid out as llama.cpp's own converter lays it out (see
weightops.quant.gguf_llama): llama.cpp's architecture name, hyper-parameters and tensor
names, q/k rows in llama.cpp's RoPE order, the tokenizer, the chat template; a tied
lm_head is left out. llama.cpp's `llama-cli -m OUT.gguf` or llama-cpp-python load it.

Types. GGUF stores one type per tensor. The linear weights of the decoder blocks are
GGML k-quants: Q2_K (2.625 bits per weight) by default, Q4_K (4.5 bits) for the
tensors named in `q4_tensors` or given a budget of at least 4.5 bits in `mixed`
(weightops.quant.gguf_kquants). A k-quant needs rows that are a multiple of 256; for a
matrix whose rows are not, the export falls back exactly as llama.cpp's quantizer does:
Q2_K -> Q4_0 (4.5 bits), Q4_K -> Q5_0 (5.5 bits) (weightops.quant.gguf_legacy), and F16
if the rows are not a multiple of 32 either. Norms and other 1-D tensors are F32,
token_embd and an untied output F16, as the converter writes them.

weightops' own mixed 2/4-bit scheme (weightops.quant.mixed) picks 2 or 4 bits per group
of 64 inputs inside one matrix; GGUF's types are per tensor, so those groups cannot be
expressed in it. The export therefore re-quantizes every tensor from the float weights.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from weightops.arch import is_block_linear, text_config
from weightops.io.checkpoint import Checkpoint
from weightops.io.safetensors_file import FileReader
from weightops.quant import gguf_kquants, gguf_legacy, gguf_llama
from weightops.quant.mixed import QuantError

# The type llama.cpp falls back to when rows are not a multiple of 256 (llama-quant.cpp).
FALLBACK = {"Q2_K": "Q4_0", "Q4_K": "Q5_0"}
BLOCK_WEIGHTS = {"Q2_K": 256, "Q4_K": 256, "Q4_0": 32, "Q5_0": 32}
BLOCK_BYTES = {**gguf_kquants.BLOCK_BYTES, **gguf_legacy.BLOCK_BYTES}
BITS_PER_WEIGHT = {t: 8 * BLOCK_BYTES[t] / BLOCK_WEIGHTS[t] for t in BLOCK_BYTES}
_FILE_TYPE = {"Q2_K": 10, "Q4_K": 14}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q2_K / Q4_K_S
_FP16_MAX = float(np.finfo(np.float16).max)


def block_type(wanted: str, row_length: int) -> str:
    """`wanted` (Q2_K / Q4_K) if a row fits its blocks, else llama.cpp's fallback."""
    if row_length % BLOCK_WEIGHTS[wanted] == 0:
        return wanted
    fallback = FALLBACK[wanted]
    return fallback if row_length % BLOCK_WEIGHTS[fallback] == 0 else "F16"


def _tensor_type(name: str, shape: tuple[int, ...], q4: set[str], default: str) -> str:
    if is_block_linear(name, shape) and shape[1] > 0:
        return block_type("Q4_K" if name in q4 else default, shape[1])
    return "F32" if len(shape) <= 1 else "F16"


def _nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    numel = math.prod(shape)
    if qtype in BLOCK_BYTES:
        return numel // BLOCK_WEIGHTS[qtype] * BLOCK_BYTES[qtype]
    return numel * (2 if qtype == "F16" else 4)


def _encode(a: np.ndarray, qtype: str, name: str) -> np.ndarray:
    try:
        if qtype in gguf_kquants.BLOCK_BYTES:
            return gguf_kquants.quantize_rows(a, qtype)
        if qtype in gguf_legacy.BLOCK_BYTES:
            return gguf_legacy.quantize_legacy(a, qtype)
    except QuantError as e:
        raise QuantError(f"{name}: {e}") from e
    if qtype == "F16":
        if np.abs(a).max(initial=0.0) > _FP16_MAX:
            raise QuantError(
                f"{name}: values beyond the fp16 range cannot be written as F16",
                hint="the checkpoint has weights larger than 65504",
            )
        return a.astype(np.float16)
    return a.astype(np.float32)


def _q4_names(
    ckpt: Checkpoint, q4_tensors: Iterable[str] | None, mixed: dict[str, float] | None
) -> set[str]:
    names = set(q4_tensors or ())
    for name, bits in (mixed or {}).items():
        if bits >= BITS_PER_WEIGHT["Q4_K"]:
            names.add(name)
    unknown = sorted((names | set(mixed or {})) - set(ckpt.tensors))
    if unknown:
        raise QuantError(
            f"{ckpt.path}: no tensor named {', '.join(map(repr, unknown[:3]))}"
            + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""),
            hint="q4_tensors and mixed take the checkpoint's tensor names",
        )
    return names


def export_gguf(
    model_folder: str | Path,
    out_path: str | Path,
    *,
    q4_tensors: Iterable[str] | None = None,
    mixed: dict[str, float] | None = None,
    default: str = "Q2_K",
    pre_tokenizer: str | None = None,
) -> dict[str, Any]:
    """Write the checkpoint at `model_folder` to the GGUF file `out_path`, ready for
    llama.cpp.

    Every linear weight of the decoder blocks becomes `default` (Q2_K or Q4_K), or Q4_K
    when its name is in `q4_tensors` or `mixed` gives it a budget of at least 4.5 bits
    per weight (a per-tensor budget, as weightops' mixed quantizer takes; below 4.5 it
    gets Q2_K); rows that do not fit 256-weight blocks take llama.cpp's fallback type.
    `q4_tensors` and `mixed` take the checkpoint's (Hugging Face) names.
    `pre_tokenizer` names llama.cpp's pre-tokenizer when the vocabulary is not one it
    recognises. Tensors are read, converted and written one at a time; the file appears
    at `out_path` only once it is complete.

    Returns {"types": {GGUF name: type}, "counts": {type: tensors}, "bytes": file size,
    "quantized_weights": count, "bits_per_weight": over the quantized tensors (0.0
    when there are none), "pre_tokenizer": the name written}."""
    import gguf

    if default not in FALLBACK:
        raise QuantError(f"default type {default!r} is not one of {sorted(FALLBACK)}")
    ckpt = Checkpoint(model_folder)
    arch = gguf_llama.llama_cpp_arch(ckpt.config, ckpt.folder)
    q4 = _q4_names(ckpt, q4_tensors, mixed)
    names = gguf_llama.gguf_names(list(ckpt.tensors), arch, ckpt.config, ckpt.folder)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".partial")

    plan = []
    for name, info in ckpt.tensors.items():
        if names[name] is None:
            continue
        if not info.dtype.is_floating_point:
            raise QuantError(f"{ckpt.path}: tensor {name!r} is not a float tensor")
        qtype = _tensor_type(name, info.shape, q4, default)
        plan.append((name, names[name], info, qtype))

    writer = gguf.GGUFWriter(tmp, arch)
    try:
        label = ckpt.config.get("_name_or_path") or ckpt.folder.name
        gguf_llama.add_hparams(writer, ckpt.config, str(label), _FILE_TYPE[default])
        vocab_size = int(text_config(ckpt.config)["vocab_size"])
        pre = gguf_llama.add_tokenizer(writer, ckpt.folder, vocab_size, pre_tokenizer)
        for _, new, info, qtype in plan:
            # The shape is the weight shape (not bytes), so the numpy dtype given must not
            # be uint8, which the writer would take for a byte shape.
            writer.add_tensor_info(
                new,
                info.shape,
                np.dtype(np.float16 if qtype == "F16" else np.float32),
                _nbytes(qtype, info.shape),
                raw_dtype=gguf.GGMLQuantizationType[qtype],
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with FileReader() as reader:
            for name, _, info, qtype in plan:
                a = reader.read(info).float().numpy()
                if (n_head := gguf_llama.qk_heads(name, arch, ckpt.config)) is not None:
                    a = gguf_llama.permute(a, n_head)
                writer.write_tensor_data(_encode(a, qtype, name))
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise

    quantized = [(info.numel, t) for _, _, info, t in plan if t in BLOCK_BYTES]
    q_weights = sum(n for n, _ in quantized)
    q_bits = sum(n * BITS_PER_WEIGHT[t] for n, t in quantized)
    return {
        "types": {new: qtype for _, new, _, qtype in plan},
        "counts": dict(Counter(qtype for *_, qtype in plan)),
        "bytes": out_path.stat().st_size,
        "quantized_weights": q_weights,
        "bits_per_weight": q_bits / q_weights if q_weights else 0.0,
        "pre_tokenizer": pre,
    }
