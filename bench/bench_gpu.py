"""GPU benchmarks of weightops.kernels (needs a CUDA device and cupy).

1. The fused 2/4-bit dequantize + GEMV kernel against an fp16 GEMV (cuBLAS through
   torch) on Llama-7B-shaped matrices: time, and achieved memory bandwidth (bytes the
   kernel must read: packed weights + x + y) against the device's peak.
2. Batched truncated SVD (the TSV-M path) against torch's per-matrix full SVD on the
   same device, over the 2-D weights of one layer of the ~150M family.
3. Decode tokens/s of a Llama-shaped model on QuantLinear against the fp16 model.

    python bench/bench_gpu.py --peak-gbs 4800      # H200: 4.8 TB/s HBM3e
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section

LLAMA7B = [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)]


def cuda_time(fn, iters: int = 200) -> float:
    """Median seconds per call, measured with CUDA events after warm-up."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def gemv_rows(peak_gbs: float) -> list[str]:
    from weightops.kernels import cupy_backend
    from weightops.quant.mixed import quantize

    rows = []
    for label, out_f, in_f in LLAMA7B:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        p = quantize(w, avg_bits=2.85)
        on_gpu = type(p)(
            p.shape,
            p.group_size,
            p.k4,
            *(t.cuda() for t in (p.q2, p.q4, p.gmap, p.scale, p.zero, p.super)),
        )
        x = torch.randn(1, in_f, device="cuda")
        w16 = w.half().cuda()
        x16 = x.half()
        t_q = cuda_time(lambda: cupy_backend.quant_matmul(x, on_gpu))  # noqa: B023
        t_h = cuda_time(lambda: x16 @ w16.T)  # noqa: B023
        q_bytes = p.bits / 8 + in_f * 4 + out_f * 4
        h_bytes = out_f * in_f * 2 + in_f * 2 + out_f * 2
        q_bw, h_bw = q_bytes / t_q / 1e9, h_bytes / t_h / 1e9
        rows.append(
            f"| {label} {out_f}×{in_f} | {p.bits_per_weight:.2f} | {t_q * 1e6:.1f} | "
            f"{t_h * 1e6:.1f} | {t_h / t_q:.2f}× | {q_bw:.0f} ({q_bw / peak_gbs:.0%}) | "
            f"{h_bw:.0f} ({h_bw / peak_gbs:.0%}) |"
        )
        print(rows[-1], flush=True)
    return rows


def svd_rows(family: Path) -> list[str]:
    from safetensors import safe_open

    from weightops import kernels

    mats = []
    for shard in sorted(family.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if ".layers.0." in k and k.endswith("proj.weight"):
                    mats.append(f.get_tensor(k).float().cuda())
    shapes = sorted({tuple(m.shape) for m in mats})
    rows = []
    for shape in shapes:
        batch = torch.stack([m for m in mats if tuple(m.shape) == shape])
        k = min(shape) // 4  # TSV-M with 4 models keeps ⌊r/T⌋ components of each
        t_full = cuda_time(lambda: [torch.linalg.svd(m, full_matrices=False) for m in batch], 5)  # noqa: B023
        t_trunc = cuda_time(lambda: kernels.truncated_svd(batch, k), 5)  # noqa: B023
        rows.append(
            f"| {len(batch)} × {shape[0]}×{shape[1]}, k = {k} | {t_full * 1e3:.1f} | "
            f"{t_trunc * 1e3:.1f} | {t_full / t_trunc:.1f}× |"
        )
        print(rows[-1], flush=True)
    return rows


def decode_rows(tokens: int) -> list[str]:
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    from weightops.demo import _tokenizer
    from weightops.quant.model import load, quantize_model

    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(cfg).save_pretrained(f"{tmp}/m")
        _tokenizer(Path(f"{tmp}/m"))
        quantize_model(f"{tmp}/m", f"{tmp}/q")
        fp16 = LlamaForCausalLM.from_pretrained(f"{tmp}/m", dtype=torch.float16).cuda().eval()
        quant = load(f"{tmp}/q", dtype=torch.float16).cuda().eval()
        ids = torch.zeros(1, 8, dtype=torch.long, device="cuda")
        rates = {}
        for label, model in (("fp16", fp16), ("QuantLinear 2/4-bit", quant)):
            with torch.no_grad():
                model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                torch.cuda.synchronize()
            rates[label] = tokens / (time.perf_counter() - t0)
    return [f"| {k} | {v:.1f} | {v / rates['fp16']:.2f}× |" for k, v in rates.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peak-gbs", type=float, required=True, help="The device's peak HBM GB/s.")
    ap.add_argument("--family", type=Path, default=Path("bench/.work/family-16L/base"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from weightops.kernels import cupy_backend

    if not (torch.cuda.is_available() and cupy_backend.available()):
        sys.exit("bench_gpu.py needs a CUDA device and cupy (pip install 'weightops[gpu]')")
    device = torch.cuda.get_device_name()
    body = [
        f"- Command: `python {shlex.join(['bench/bench_gpu.py', *sys.argv[1:]])}`",
        f"- Device: {device} (peak {args.peak_gbs:.0f} GB/s as given); host: {machine()}",
        "",
        "| matrix (Llama-7B) | bits/weight | 2/4-bit GEMV µs | fp16 GEMV µs | speed-up "
        "| 2/4-bit GB/s (of peak) | fp16 GB/s (of peak) |",
        "|---|---|---|---|---|---|---|",
        *gemv_rows(args.peak_gbs),
        "",
    ]
    if (args.family / "config.json").exists():
        body += [
            "| layer-0 matrices of the 150M family | full SVD, one by one (ms) "
            "| batched truncated SVD (ms) | speed-up |",
            "|---|---|---|---|",
            *svd_rows(args.family),
            "",
        ]
    body += [
        f"| decode, batch 1, {args.tokens} tokens | tokens/s | vs fp16 |",
        "|---|---|---|",
        *decode_rows(args.tokens),
        "",
    ]
    text = "\n".join(body) + "\n"
    print(text)
    if not args.no_write:
        write_section("bench_gpu", f"GPU kernels on {device}", text)


if __name__ == "__main__":
    main()
