"""2-bit weight quantization at equal stored bits: round-to-nearest, HQQ, weightops mixed 2/4.

Every method is applied to the linear weights of the decoder blocks and counted with all
of its stored bits (codes, scales, zeros, group maps, super-scales). Metrics: mean
relative Frobenius error over the matrices, and perplexity on held-out text of a small
character-level Llama trained here for a couple of minutes on the Python standard
library's source. A few matrices of bench/.work/family-16L/base (if present) give a
second reconstruction-error column, and `quantize_model` on that checkpoint gives the
throughput line.

HQQ runs in its own virtualenv (bench/.work/venv-hqq, created on first use) in a
subprocess that reads the weights from a file and writes back the dequantized matrices.

    python bench/bench_quant.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import TORCH_VERSION, WORK
from report import machine, write_section

from weightops.quant.calibrate import model_hessians
from weightops.quant.evaluate import perplexity
from weightops.quant.mixed import dequantize, quantize

OUT = WORK / "quant"
VENV = WORK / "venv-hqq"
BIG = WORK / "family-16L" / "base"
GROUP = 64
VOCAB = 258  # byte-range characters, unknown, end of text
UNK = 256
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Runs under the HQQ virtualenv: argv = input .pt, output .pt.
HQQ_SCRIPT = r"""
import sys, torch
from hqq.core.quantize import Quantizer

def meta_quant(t):
    # 8-bit min-max of a scale or zero tensor in groups of 128, fp16 meta (HQQLinear's
    # scale/zero quantization, done through the same Quantizer call).
    q, meta = Quantizer.quantize(t, nbits=8, channel_wise=True, group_size=128,
                                 optimize=False, axis=0, bitpack=False, device="cpu")
    s, z = meta["scale"].half().float(), meta["zero"].half().float()
    flat = q.float().reshape(128, -1)
    deq = ((flat - z) * s).reshape(t.shape)
    return deq, 8 * t.numel() + 32 * s.numel()

weights = torch.load(sys.argv[1])
out = {}
for name, w in weights.items():
    q, meta = Quantizer.quantize(w.float(), nbits=2, channel_wise=True, group_size=64,
                                 optimize=True, axis=1, bitpack=False, device="cpu")
    q = q.float()
    scale = meta["scale"].half().float()   # [groups, 1], already inverted
    zero = meta["zero"].half().float()
    n = w.numel()
    variants = {"fp16": (scale, zero, 2 * n + 32 * scale.numel())}
    zq, zbits = meta_quant(zero)
    variants["q8zero"] = (scale, zq, 2 * n + 16 * scale.numel() + zbits)
    sq, sbits = meta_quant(scale)
    variants["q8both"] = (sq, zq, 2 * n + sbits + zbits)
    for key, (s, z, bits) in variants.items():
        out[f"{key}/{name}"] = ((q - z) * s).reshape(w.shape)
        out[f"{key}/{name}#bits"] = torch.tensor(bits, dtype=torch.float64)
torch.save(out, sys.argv[2])
"""


# ---------------------------------------------------------------- data and model


def corpus(max_chars: int) -> str:
    """Source of standard-library modules, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def encode(text: str) -> torch.Tensor:
    return torch.tensor([ord(c) if ord(c) < 256 else UNK for c in text], dtype=torch.long)


def small_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=257,
        pad_token_id=257,
    )


def train_small_lm(ids: torch.Tensor, steps: int, seed: int) -> torch.nn.Module:
    """A fixed number of AdamW steps (warm-up, then cosine decay), cached on disk: the
    model only depends on the corpus, the step count and the seed, so reruns of the
    benchmark compare the methods on the same network."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    cache = OUT / f"small-lm-{steps}-{seed}.safetensors"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(small_config())
    if cache.exists():
        model.load_state_dict(load_file(cache))
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (
            min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
        ),
    )
    seq, batch = 128, 16
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step}/{steps} loss {loss.item():.3f}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, cache)
    return model.eval()


def is_block_linear(name: str) -> bool:
    return ".layers." in name and name.endswith(".weight") and name.split(".")[-2] in BLOCK_LINEARS


# ---------------------------------------------------------------- methods


def rtn(w: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """Asymmetric min-max 2-bit per group, fp16 scale and fp16 zero per group."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // GROUP, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / 3).clamp_min(1e-8).half().float()
    lo = lo.half().float()
    q = ((g - lo) / s).round().clamp(0, 3)
    return (q * s + lo).reshape(out_f, in_f), 2 * w.numel() + 32 * (w.numel() // GROUP)


def weightops_mixed(
    avg_bits: float, hessians: dict | None = None, outlier_share: float = 0.0, **options
):
    """weightops' quantizer; with `hessians` ({name: mean x xᵀ}) the calibrated path, with
    `outlier_share` that share of each row kept as fp16 outliers (as quantize_model does)."""

    def run(w: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
        h = None if hessians is None else hessians.get(name)
        n_out = round(outlier_share * w.shape[1])
        p = quantize(
            w.float(), group_size=GROUP, avg_bits=avg_bits, hessian=h, outliers=n_out, **options
        )
        return dequantize(p), p.bits

    return run


def ensure_hqq() -> str:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
        subprocess.run([*pip, "hqq"], check=True)
    return subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('hqq'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def hqq_all(weights: dict[str, torch.Tensor], tag: str) -> dict[str, tuple[dict, int]]:
    """{variant: ({name: dequantized}, bits)} from one HQQ subprocess."""
    OUT.mkdir(parents=True, exist_ok=True)
    src, dst, script = OUT / f"{tag}-in.pt", OUT / f"{tag}-hqq.pt", OUT / "hqq_run.py"
    torch.save({k: v.float().contiguous() for k, v in weights.items()}, src)
    script.write_text(HQQ_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    subprocess.run(
        [str(VENV / "bin" / "python"), str(script), str(src), str(dst)], check=True, env=env
    )
    raw = torch.load(dst)
    result: dict[str, tuple[dict, int]] = {}
    for key, value in raw.items():
        if key.endswith("#bits"):
            continue
        variant, name = key.split("/", 1)
        deq, bits = result.setdefault(variant, ({}, 0))
        deq[name] = value
        result[variant] = (deq, bits + int(raw[key + "#bits"]))
    return result


def rel_error(orig: dict[str, torch.Tensor], deq: dict[str, torch.Tensor]) -> float:
    errs = [float((deq[k] - w.float()).norm() / w.float().norm()) for k, w in orig.items()]
    return sum(errs) / len(errs)


def apply_all(weights, methods) -> dict[str, tuple[dict, float, float]]:
    """{method: ({name: dequantized}, bits/weight, seconds)} for the in-process methods."""
    numel = sum(w.numel() for w in weights.values())
    out = {}
    for label, fn in methods.items():
        t0 = time.perf_counter()
        deq, bits = {}, 0
        for name, w in weights.items():
            deq[name], b = fn(w, name)
            bits += b
        out[label] = (deq, bits / numel, time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------- throughput


def throughput() -> dict | None:
    if not (BIG / "config.json").exists():
        return None
    dest = OUT / "family-16L-q"
    code = (
        "import json, sys, time, shutil\n"
        "from weightops.quant.model import quantize_model\n"
        "shutil.rmtree(sys.argv[2], ignore_errors=True)\n"
        "t = time.perf_counter()\n"
        "m = quantize_model(sys.argv[1], sys.argv[2], group_size=64, avg_bits=2.85)\n"
        "print(json.dumps({'seconds': time.perf_counter() - t,"
        " 'bpw': m.get('quantized_bits_per_weight')}))\n"
    )
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-c", code, str(BIG), str(dest)],
        check=True,
        capture_output=True,
        text=True,
    )
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["peak_rss_mib"] = int(proc.stderr.strip().splitlines()[-1]) / 1024
    in_bytes = 0
    with open(BIG / "model.safetensors.index.json") as f:
        names = json.load(f)["weight_map"]
    for shard in sorted(set(names.values())):
        with safe_open(str(BIG / shard), "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if is_block_linear(k):
                    t = f.get_slice(k)
                    shape = t.get_shape()
                    in_bytes += shape[0] * shape[1] * 2  # bf16
    info["input_mb"] = in_bytes / 1e6
    info["mb_per_s"] = info["input_mb"] / info["seconds"]
    return info


def big_matrices() -> dict[str, torch.Tensor]:
    if not (BIG / "config.json").exists():
        return {}
    with open(BIG / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    wanted = [
        f"model.layers.{i}.{kind}.weight"
        for i in (0, 8, 15)
        for kind in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.down_proj",
        )
    ]
    out = {}
    for name in wanted:
        with safe_open(str(BIG / weight_map[name]), "pt") as f:
            out[name] = f.get_tensor(name).float()
    return out


# ---------------------------------------------------------------- report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--chars", type=int, default=1_500_000)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t_all = time.perf_counter()
    from weightops.demo import quiet_transformers

    quiet_transformers()
    hqq_version = ensure_hqq()

    ids = encode(corpus(args.chars))
    cut = ids.numel() - args.eval_tokens
    train_ids, held = ids[:cut], ids[cut:]
    model = train_small_lm(train_ids, args.train_steps, args.seed)
    steps = args.train_steps
    n_params = sum(p.numel() for p in model.parameters())
    state = model.state_dict()
    small = {k: v.detach().clone() for k, v in state.items() if is_block_linear(k)}
    print(f"trained {n_params / 1e6:.1f}M params, {steps} steps; {len(small)} matrices", flush=True)

    def ppl_with(deq: dict[str, torch.Tensor]) -> float:
        model.load_state_dict({**state, **deq})
        value = perplexity(model, held, 256)
        model.load_state_dict(state)
        return value

    base_ppl = ppl_with({})
    # Calibration for the calibrated rows: 16 windows of training text (never held-out).
    gen = torch.Generator().manual_seed(args.seed + 1)
    starts = torch.randint(0, train_ids.numel() - 256, (16,), generator=gen).tolist()
    hessians = model_hessians(model, [train_ids[i : i + 256] for i in starts], list(small))
    methods = {
        "RTN 2-bit (min-max, fp16 scale+zero)": rtn,
        "weightops all 2-bit, min-max": weightops_mixed(2.5, k4=0, clip=False, refine=False),
        "weightops all 2-bit, clip search": weightops_mixed(2.5, k4=0, refine=False),
        "weightops all 2-bit, clip search + LS refinement": weightops_mixed(2.5, k4=0),
        "weightops mixed 2/4, avg_bits=2.5": weightops_mixed(2.5),
        "weightops mixed 2/4, avg_bits=2.85": weightops_mixed(2.85),
    }
    calibrated = {
        "weightops all 2-bit + calibration (GPTQ-style codes)": weightops_mixed(
            2.5, hessians, k4=0
        ),
        "weightops mixed 2/4, avg_bits=2.5 + calibration": weightops_mixed(2.5, hessians),
        "weightops mixed 2/4, avg_bits=2.85 + calibration": weightops_mixed(2.85, hessians),
        "weightops mixed 2/4 + 1/256 fp16 outliers, avg_bits=2.85 + calibration": (
            weightops_mixed(2.85, hessians, outlier_share=1 / 256)
        ),
    }
    hqq_labels = {
        "fp16": f"HQQ {hqq_version} 2-bit (fp16 scale+zero)",
        "q8zero": f"HQQ {hqq_version} 2-bit (8-bit zero, fp16 scale)",
        "q8both": f"HQQ {hqq_version} 2-bit (8-bit scale+zero)",
    }

    def run_set(weights, tag, extra=None):
        res = apply_all(weights, {**methods, **(extra or {})})
        numel = sum(w.numel() for w in weights.values())
        t0 = time.perf_counter()
        hq = hqq_all(weights, tag)
        dt = time.perf_counter() - t0
        for key, (deq, bits) in hq.items():
            res[hqq_labels[key]] = (deq, bits / numel, dt)
        return res

    small_res = run_set(small, "small", calibrated)
    print("small LM quantized", flush=True)
    big = big_matrices()
    big_res = run_set(big, "big") if big else {}
    print("16L matrices quantized", flush=True)
    tp = throughput()

    order = [
        "RTN 2-bit (min-max, fp16 scale+zero)",
        hqq_labels["fp16"],
        hqq_labels["q8zero"],
        hqq_labels["q8both"],
        *[k for k in methods if not k.startswith("RTN")],
        *calibrated,
    ]
    rows = []
    for label in order:
        deq, bpw, _ = small_res[label]
        err = rel_error(small, deq)
        ppl = ppl_with(deq)
        if label in big_res:
            bdeq, bbpw, _ = big_res[label]
            big_cols = f" {bbpw:.3f} | {rel_error(big, bdeq):.4f} |"
        else:
            big_cols = " n/a | n/a |"
        rows.append((label, bpw, err, ppl, big_cols))
        print(f"{label}: {bpw:.3f} bpw, err {err:.4f}, ppl {ppl:.3f}{big_cols}", flush=True)

    wall = time.perf_counter() - t_all
    lines = [
        "| method | bits/weight (small LM) | rel. error (small LM) | perplexity (small LM) "
        "| bits/weight (16L) | rel. error (16L) |",
        "|---|---|---|---|---|---|",
        f"| fp32 (unquantized) | 32 | 0 | {base_ppl:.3f} | 16 (bf16) | 0 |",
    ]
    lines += [
        f"| {lab} | {bpw:.3f} | {err:.4f} | {ppl:.3f} |{bc}" for lab, bpw, err, ppl, bc in rows
    ]
    if tp:
        tp_line = (
            f"- Throughput of `quantize_model` (avg_bits 2.85, group 64) on family-16L/base "
            f"({tp['input_mb']:.0f} MB of bf16 block-linear weights): {tp['seconds']:.1f} s wall, "
            f"{tp['mb_per_s']:.1f} MB/s, peak RSS {tp['peak_rss_mib']:.0f} MiB "
            f"(`/usr/bin/time -f %M`), {tp['bpw']:.3f} bits/weight as written."
        )
    else:
        tp_line = "- Throughput: skipped (bench/.work/family-16L/base not present)."
    by = {lab: (bpw, err, ppl) for lab, bpw, err, ppl, _ in rows}
    r, h = by["RTN 2-bit (min-max, fp16 scale+zero)"], by[hqq_labels["fp16"]]

    def versus(label: str) -> str:
        w = by[label]
        return (
            f"{label} ({w[0]:.3f} bits): perplexity {w[2]:.3f}, error {w[1]:.4f}, against "
            f"RTN {r[2]:.3f} / {r[1]:.4f} and HQQ {h[2]:.3f} / {h[1]:.4f} at {h[0]:.3f} bits "
            f"(perplexity gap to fp32 {(w[2] - base_ppl) / (h[2] - base_ppl):.2f}× HQQ's)"
        )

    verdict = (
        "At equal or fewer bits than RTN and HQQ (2.5): "
        + versus("weightops mixed 2/4, avg_bits=2.5")
        + "; calibrated, "
        + versus("weightops mixed 2/4, avg_bits=2.5 + calibration")
        + "."
    )
    hlow = by[hqq_labels["q8both"]]
    verdict += (
        f" HQQ with 8-bit scale+zero stores {hlow[0]:.3f} bits (perplexity {hlow[2]:.3f}), "
        "below weightops' all-2-bit floor (2.41 bits on rows of 256, 2.31 on rows of 768: "
        "8-bit scale and zero per group, the group map and two fp16 super-scales per row). "
        "avg_bits=2.85 lands at 2.50 on the small LM because rows of 256 inputs (4 groups) "
        "can only take 0 or 1 4-bit group (2.41 or 2.91 bits)."
    )
    cmd = "python " + " ".join(shlex.quote(a) for a in ["bench/bench_quant.py", *sys.argv[1:]])
    body = (
        "Each method replaces every linear weight of the decoder blocks (q/k/v/o, gate/up/down) "
        "by its dequantized version; bits/weight counts everything stored (codes, scales, "
        "zeros, group maps, super-scales, meta-scales). Group size 64 everywhere. "
        f"Small LM: character-level Llama (hidden 256, intermediate 768, 4 layers, 4 heads, "
        f"{n_params / 1e6:.1f}M parameters) trained for "
        f"{steps} AdamW steps (batch 16 × 128, warm-up then cosine; cached under bench/.work/quant) on standard-library source; perplexity on "
        f"{held.numel()} held-out characters, windows of 256. 16L: relative error over "
        f"{len(big)} matrices (layers 0, 8, 15: q, k, o, gate, down) of bench/.work/family-16L/base. "
        "RTN is min-max per group; HQQ is `Quantizer.quantize(nbits=2, group_size=64, "
        "optimize=True, axis=1)` on CPU, its scale/zero optionally 8-bit quantized in groups of "
        "128 (fp16 meta); weightops is `weightops.quant.mixed.quantize`, without calibration "
        "unless the row says so (then with the mean x xᵀ of 16 windows of 256 training "
        "characters, never the held-out text). "
        "Rel. error is the mean over matrices of ‖W − Ŵ‖_F / ‖W‖_F.\n\n"
        f"- Command: `{cmd}`\n- Machine: {machine()}\n"
        f"- Peer: hqq {hqq_version} (own virtualenv, torch {TORCH_VERSION})\n"
        f"- Total wall time: {wall / 60:.1f} min\n\n" + "\n".join(lines) + "\n\n"
        f"{tp_line}\n- {verdict}\n"
    )
    print(body)
    if not args.no_write:
        write_section("bench_quant", "Quantization: 2-bit RTN vs HQQ vs weightops mixed 2/4", body)


if __name__ == "__main__":
    main()
