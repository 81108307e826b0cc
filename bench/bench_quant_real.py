"""Quantization quality on a real model: SmolLM2-135M-Instruct, weightops against HQQ
and llama.cpp's own quantizer (k-quants and IQ2_XS), perplexity at 2.3–4.5 bits.

SmolLM2's weights came through 4-bit (Q4_1) quantization on their way here
(bench/real_model.py): every figure is on those weights.

Every row replaces only the linear weights of the decoder blocks (q/k/v/o, gate/up/down)
by that tool's dequantized weights; embeddings (tied with lm_head) and norms stay as in
the bf16 checkpoint for all rows. Bits per weight count every stored bit of the block
linears (codes, scales, zeros, maps, super-scales) over their weights, the same way for
every tool; embeddings are not counted. Perplexity: the same transformers float32 model
and code (weightops.quant.evaluate.perplexity) for every row, on the first TOKENS tokens
of the text in windows of WINDOW.

- weightops: `quantize_model` (the `weightops quantize` command) at several budgets,
  with and without calibration; dequantized from the written folder.
- HQQ (own virtualenv, bench_quant.ensure_hqq): 2/3/4-bit, groups of 64,
  optimize=True, fp16 scale and zero per group (nbits + 0.5 bits per weight).
- llama.cpp: an F16 GGUF written by weightops' exporter, quantized by llama.cpp's own
  `llama_model_quantize` (libllama from the llama-cpp-python wheel, through ctypes) to
  Q2_K, Q3_K_M, Q4_K_M and IQ2_XS with llama.cpp's per-tensor type choices and its
  fallbacks for rows of 576 (not a multiple of 256); read back and dequantized with the
  `gguf` package. IQ2_XS needs an importance matrix: it is computed here as llama-imatrix
  does (mean x² of each linear's input per column) on the calibration text, in
  transformers float32.

Texts: evaluation on bench/data/quant_heldout.txt (five topics of the Python language
reference shipped in the standard library as pydoc_data.topics, PSF licence:
execmodel, naming, truth, exceptions, objects); calibration on the pydantic package's
METADATA (MIT), never evaluated on. `--text` evaluates on another file the same way.

    python bench/bench_quant_real.py [--text FILE] [--no-write]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import VENV as HQQ_VENV
from bench_quant import ensure_hqq
from bench_quant_speed import calibration_text
from peers import WORK
from real_model import smollm2
from report import REPO, machine, write_section

from weightops.arch import is_block_linear
from weightops.io.checkpoint import Checkpoint
from weightops.quant.evaluate import perplexity

OUT = WORK / "quant-real"
HELDOUT = REPO / "bench" / "data" / "quant_heldout.txt"
TOKENS = 2048
WINDOW = 512
LLAMA_WHEEL = WORK / "llamacpp-wheel" / "llama_cpp" / "lib"
# llama.cpp's LLAMA_FTYPE values.
LLAMA_TYPES = {"Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "IQ2_XS": 20}
WEIGHTOPS_RUNS = [
    ("default (no calibration)", {}),
    ("--calib, --avg-bits 2.35", {"avg_bits": 2.35, "calib": True}),
    ("--calib (default budget)", {"calib": True}),
    ("--calib, --avg-bits 3.3", {"avg_bits": 3.3, "calib": True}),
    ("--calib, --bits 4", {"bits": 4, "calib": True}),
    ("--calib, --avg-bits 3.0", {"avg_bits": 3.0, "calib": True}),
    ("--calib, --avg-bits 3.95", {"avg_bits": 3.95, "calib": True}),
    ("--calib, --bits 4, --outliers 0.005", {"bits": 4, "outliers": 0.005, "calib": True}),
]

HQQ_RUN = r"""
import sys, torch
from hqq.core.quantize import Quantizer
weights = torch.load(sys.argv[1])
out = {}
for nbits in (2, 3, 4):
    for name, w in weights.items():
        q, meta = Quantizer.quantize(w.float(), nbits=nbits, channel_wise=True, group_size=64,
                                     optimize=True, axis=1, bitpack=False, device="cpu")
        s, z = meta["scale"].half().float(), meta["zero"].half().float()
        out[f"{nbits}/{name}"] = ((q.float() - z) * s).reshape(w.shape)
torch.save(out, sys.argv[2])
"""


class _Params(ctypes.Structure):
    _fields_ = [
        ("nthread", ctypes.c_int32),
        ("ftype", ctypes.c_int),
        ("output_tensor_type", ctypes.c_int),
        ("token_embedding_type", ctypes.c_int),
        ("allow_requantize", ctypes.c_bool),
        ("quantize_output_tensor", ctypes.c_bool),
        ("only_copy", ctypes.c_bool),
        ("pure", ctypes.c_bool),
        ("keep_split", ctypes.c_bool),
        ("dry_run", ctypes.c_bool),
        ("imatrix", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p),
        ("tt_overrides", ctypes.c_void_p),
        ("prune_layers", ctypes.c_void_p),
        ("max_buf_size", ctypes.c_size_t),
    ]


class _Imatrix(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("data", ctypes.POINTER(ctypes.c_float)),
        ("size", ctypes.c_size_t),
    ]


def llama_quantize(src: Path, dst: Path, ftype: int, imatrix: dict[str, torch.Tensor]) -> None:
    """llama.cpp's own quantizer on an F16 GGUF (imatrix: GGUF name -> mean x² per column)."""
    lib = ctypes.CDLL(str(LLAMA_WHEEL / "libllama.so"))
    lib.llama_backend_init()
    lib.llama_model_quantize_default_params.restype = _Params
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_Params)]
    params = lib.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 2
    keep = []
    if imatrix:
        entries = (_Imatrix * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = (ctypes.c_float * values.numel())(*values.tolist())
            keep.append(arr)
            entries[i] = _Imatrix(name.encode(), arr, values.numel())
        entries[len(imatrix)] = _Imatrix(None, None, 0)
        params.imatrix = ctypes.cast(entries, ctypes.c_void_p)
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)):
        raise SystemExit(f"llama.cpp could not quantize {src} to ftype {ftype}")


def f16_gguf(folder: Path, dst: Path) -> None:
    """The checkpoint as an F16 GGUF (F32 norms), llama.cpp's quantizer input."""
    from weightops.quant import gguf_export

    original = gguf_export._tensor_type
    gguf_export._tensor_type = lambda name, shape, q4, default: "F32" if len(shape) <= 1 else "F16"
    try:
        gguf_export.export_gguf(folder, dst)
    finally:
        gguf_export._tensor_type = original


def gguf_linears(path: Path, folder: Path, names: list[str]) -> tuple[dict, float]:
    """Dequantized block linears of a GGUF file under their HF names, and their bits per
    weight from the stored types."""
    import gguf
    from gguf_llamacpp import dequantized_state

    from weightops.quant.gguf_llama import gguf_names

    config = json.loads((folder / "config.json").read_text())
    to_gguf = gguf_names(list(Checkpoint(folder).tensors), "llama", config, folder)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    state = dequantized_state(path, folder)
    bits = weights = 0
    for name in names:
        block, size = gguf.GGML_QUANT_SIZES[types[to_gguf[name]]]
        n = state[name].numel()
        bits += n // block * size * 8
        weights += n
    return {n: state[n] for n in names}, bits / weights


@torch.no_grad()
def imatrix(model: torch.nn.Module, windows: list[torch.Tensor], names: list[str]) -> dict:
    """{HF weight name: mean x² per input column} over the calibration windows."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def run(_m: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return run

    handles = [
        model.get_submodule(n[: -len(".weight")]).register_forward_pre_hook(hook(n)) for n in names
    ]
    for w in windows:
        model(w.reshape(1, -1))
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in names}


def weightops_linears(out: Path) -> dict[str, torch.Tensor]:
    from weightops.quant import dequantize
    from weightops.quant.model import QuantLinear, load

    model = load(out)
    return {
        f"{name}.weight": dequantize(m.packed())
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightops.quant.calibrate import read_texts
    from weightops.quant.model import quantize_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", type=Path, default=HELDOUT, help="evaluation text")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated: weightops,hqq,llama")
    ap.add_argument(
        "--weightops-runs", default="", help="comma-separated indices into WEIGHTOPS_RUNS"
    )
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    started = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    folder = smollm2()
    calib = calibration_text()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tok(args.text.read_text()).input_ids[:TOKENS])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    names = [n for n, info in Checkpoint(folder).tensors.items() if is_block_linear(n, info.shape)]
    original = {n: model.get_parameter(n).detach().clone() for n in names}

    def ppl(replace: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(replace, strict=False)
        try:
            return perplexity(model, ids, WINDOW)
        finally:
            model.load_state_dict(original, strict=False)

    saved_runs = sorted(OUT.glob(f"rows-{args.text.stem}-*.json"))
    if skip >= {"weightops", "hqq", "llama"} and saved_runs:
        # Only joining earlier runs: their bf16 perplexity, measured the same way.
        base = json.loads(saved_runs[0].read_text())["bf16"]
    else:
        base = perplexity(model, ids, WINDOW)
    print(f"bf16: {base:.2f}", flush=True)
    rows: list[tuple[str, float, float, float]] = []  # (label, bits, ppl, seconds)

    # Each run records its rows; the table joins the rows of every run on the same text
    # (the tools can run in separate processes, `--skip`).
    picked = [int(i) for i in args.weightops_runs.split(",") if i]
    runs = [WEIGHTOPS_RUNS[i] for i in picked] if picked else WEIGHTOPS_RUNS
    tools = "-".join(t for t in ("weightops", "hqq", "llama") if t not in skip)
    tools += "".join(f"-{i}" for i in picked)
    record = OUT / f"rows-{args.text.stem}-{tools}.json"

    def add(label: str, bits: float, value: float, seconds: float) -> None:
        rows.append((label, bits, value, seconds))
        record.write_text(json.dumps({"bf16": base, "rows": rows, "command": sys.argv[1:]}))
        print(f"{label}: {bits:.3f} bits, perplexity {value:.2f} ({seconds:.0f} s)", flush=True)

    if "weightops" not in skip:
        for label, opts in runs:
            dest = OUT / "weightops"
            t0 = time.time()
            kw = {k: v for k, v in opts.items() if k != "calib"}
            m = quantize_model(
                folder, dest, calib=calib if opts.get("calib") else None, force=True, **kw
            )
            seconds = time.time() - t0
            add(
                f"weightops {label}",
                m["quantized_bits_per_weight"],
                ppl(weightops_linears(dest)),
                seconds,
            )
            shutil.rmtree(dest, ignore_errors=True)

    if "hqq" not in skip:
        version = ensure_hqq()
        src, dst, script = OUT / "linears.pt", OUT / "hqq.pt", OUT / "hqq_run.py"
        torch.save({n: original[n] for n in names}, src)
        script.write_text(HQQ_RUN)
        t0 = time.time()
        env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "2"}
        subprocess.run(
            [str(HQQ_VENV / "bin" / "python"), str(script), str(src), str(dst)], check=True, env=env
        )
        seconds = (time.time() - t0) / 3
        raw = torch.load(dst)
        for nbits in (2, 3, 4):
            deq = {n: raw[f"{nbits}/{n}"] for n in names}
            add(f"HQQ {version} {nbits}-bit, group 64", nbits + 32 / 64, ppl(deq), seconds)

    if "llama" not in skip and (LLAMA_WHEEL / "libllama.so").exists():
        from weightops.quant.gguf_llama import gguf_names

        f16 = OUT / "smollm2-f16.gguf"
        f16_gguf(folder, f16)
        calib_ids = torch.cat([torch.tensor(tok(t).input_ids) for t in read_texts(calib)])
        windows = list(calib_ids[:8192].split(WINDOW))
        config = json.loads((folder / "config.json").read_text())
        to_gguf = gguf_names(list(Checkpoint(folder).tensors), "llama", config, folder)
        imat = {to_gguf[n]: v for n, v in imatrix(model, windows, names).items()}
        for qtype, ftype in LLAMA_TYPES.items():
            dst = OUT / f"smollm2-{qtype}.gguf"
            t0 = time.time()
            llama_quantize(f16, dst, ftype, imat if qtype.startswith("IQ") else {})
            seconds = time.time() - t0
            deq, bits = gguf_linears(dst, folder, names)
            note = (
                " (importance matrix: mean x² on the calibration text)"
                if qtype.startswith("IQ")
                else ""
            )
            add(f"llama.cpp {qtype}{note}", bits, ppl(deq), seconds)

    commands = []
    for other in sorted(OUT.glob(f"rows-{args.text.stem}-*.json")):
        if other != record:
            saved = json.loads(other.read_text())
            rows += [tuple(r) for r in saved["rows"]]
            commands.append(saved["command"])
    commands.append(sys.argv[1:])
    rows.sort(key=lambda r: r[1])
    wall = time.time() - started
    cmd = "`, `".join(
        "python " + " ".join(shlex.quote(a) for a in ["bench/bench_quant_real.py", *c])
        for c in commands
    )
    text_name = args.text.relative_to(REPO) if args.text.is_relative_to(REPO) else args.text
    table = "\n".join(
        f"| {label} | {bits:.3f} | {value:,.2f} | {value / base:.2f}× | {seconds:.0f} s |"
        for label, bits, value, seconds in rows
    )
    body = (
        "SmolLM2-135M-Instruct (**its weights came through 4-bit Q4_1 quantization**, "
        "bench/real_model.py: every figure below is on those weights). Only the linear "
        "weights of the decoder blocks are quantized; embeddings (tied with lm_head) and "
        "norms stay as in the bf16 checkpoint for every row. Bits per weight count every "
        "stored bit of the block linears (codes, scales, zeros, maps) over their weights, "
        "the same way for every tool. Perplexity: the same transformers float32 code for "
        f"every row, first {ids.numel()} tokens of `{text_name}`, windows of {WINDOW}. "
        "Calibration (weightops --calib, the IQ2_XS importance matrix): the pydantic "
        "package's METADATA, never evaluated on. Time: each quantization's wall time on "
        "the shared machine (HQQ: its three runs' average).\n\n"
        f"- Commands: `{cmd}`\n- Machine: {machine()}\n- Wall time of the last run: {wall / 60:.1f} min\n\n"
        "| quantization (weights came through 4-bit) | bits/weight (block linears) "
        "| perplexity | × bf16 | time |\n|---|---|---|---|---|\n"
        f"| bf16 checkpoint | 16 | {base:.2f} | 1.00× | |\n" + table + "\n"
    )
    print(body)
    if not args.no_write:
        key = "bench_quant_real" if args.text == HELDOUT else "bench_quant_real_text"
        write_section(
            key, "Quantization quality on SmolLM2-135M: weightops vs HQQ vs llama.cpp", body
        )


if __name__ == "__main__":
    main()
