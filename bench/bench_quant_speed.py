"""Quantization speed: `quantize_model` at a baseline revision and at the working tree,
side by side in one run, on the same threads.

The baseline's `weightops` package is exported with `git archive` under bench/.work and
each measurement runs in a fresh subprocess with PYTHONPATH on one side or the other, so
both sides see the same inputs, machine and thread count. Measured:

- throughput (MB/s of bf16 block-linear weights) at the default setting (avg_bits 2.85,
  group 64) on bench/.work/family-16L/base (built here if missing, base model only) and on
  SmolLM2-135M-Instruct (bench/real_model.py);
- calibrated quantization (`calib=`) of SmolLM2 on the long description of an installed
  package (its METADATA file, read as it is);
- HQQ's time for the same SmolLM2 linears (2-bit, group 64, optimize=True) in its own
  virtualenv (bench_quant.ensure_hqq), on the same threads;
- per tensor, whether the two sides wrote identical tensors, and their relative errors.

    python bench/bench_quant_speed.py [--baseline REV] [--threads 1,2] [--repeat N]
        [--skip-calib] [--skip-hqq]

--skip-hqq leaves out the HQQ row (its virtualenv is built from the package index).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import VENV, ensure_hqq, is_block_linear
from peers import WORK
from real_model import smollm2
from report import REPO, machine, write_section

OUT = WORK / "quant-speed"
FAMILY_BASE = WORK / "family-16L" / "base"
# main before the closed-form clip search (weightops.quant.grids).
BASELINE = "769cb4f"
CALIB_PACKAGE = "pydantic"

RUN = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from weightops.quant.model import quantize_model
t, cpu = time.perf_counter(), time.process_time()
m = quantize_model(sys.argv[1], sys.argv[2], calib=sys.argv[3] or None, force=True)
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": time.process_time() - cpu,
                  "bpw": m["quantized_bits_per_weight"],
                  "errors": {k: v["rel_error"] for k, v in m["tensors"].items()}}))
"""

HQQ_RUN = r"""
import sys, time, torch
from hqq.core.quantize import Quantizer
torch.set_num_threads(int(sys.argv[2]))
weights = torch.load(sys.argv[1])
t, cpu = time.perf_counter(), time.process_time()
for w in weights.values():
    Quantizer.quantize(w.float(), nbits=2, channel_wise=True, group_size=64,
                       optimize=True, axis=1, bitpack=False, device="cpu")
print(time.perf_counter() - t, time.process_time() - cpu)
"""


def baseline_tree(rev: str) -> Path:
    """The `weightops` package at `rev`, exported once."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    root = OUT / f"baseline-{commit}"
    if not (root / "weightops").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", commit, "weightops"], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def env_for(root: Path, threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(root),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }


def quantize(root: Path, model: Path, dest: Path, calib: Path | None, threads: int) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    args = [sys.executable, "-c", RUN, str(model), str(dest), str(calib or ""), str(threads)]
    # In the tree's own folder: `python -c` puts the working directory first on sys.path.
    proc = subprocess.run(
        args, cwd=root, env=env_for(root, threads), check=True, capture_output=True
    )
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (its CPU time and errors with it)."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def linear_mb(model: Path) -> float:
    total = 0
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if is_block_linear(k):
                    out_f, in_f = f.get_slice(k).get_shape()
                    total += out_f * in_f * 2  # bf16
    return total / 1e6


def identical_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors equal bit for bit, tensors) between two written checkpoints."""

    def load(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        return out

    ta, tb = load(a), load(b)
    same = sum(k in tb and torch.equal(v, tb[k]) for k, v in ta.items())
    return same, len(ta)


def ensure_family_base() -> Path:
    if not (FAMILY_BASE / "config.json").exists():
        from make_family import base_tensor, llama_config, tensor_shapes, write_checkpoint

        gen = torch.Generator().manual_seed(0)
        shapes = tensor_shapes(16)
        tensors = {n: base_tensor(s, gen).to(torch.bfloat16) for n, s in shapes.items()}
        write_checkpoint(FAMILY_BASE, llama_config(16), tensors)
    return FAMILY_BASE


def hqq_seconds(model: Path, threads: int) -> dict:
    src, script = OUT / "smollm2-linears.pt", OUT / "hqq_time.py"
    weights = {}
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            weights.update({k: f.get_tensor(k) for k in f.keys() if is_block_linear(k)})  # noqa: SIM118
    torch.save(weights, src)
    script.write_text(HQQ_RUN)
    proc = subprocess.run(
        [str(VENV / "bin" / "python"), str(script), str(src), str(threads)],
        env={**env_for(OUT, threads), "PYTHONPATH": ""},
        check=True,
        capture_output=True,
        text=True,
    )
    wall, cpu = map(float, proc.stdout.strip().splitlines()[-1].split())
    return {"seconds": wall, "cpu": cpu}


def calibration_text() -> Path:
    dist = importlib.metadata.distribution(CALIB_PACKAGE)
    return next(f for f in dist.files or [] if f.name == "METADATA").locate()


def error_line(label: str, old: dict, new: dict, same: tuple[int, int]) -> str:
    diffs = [new["errors"][k] - old["errors"][k] for k in old["errors"]]
    worst = max(diffs, key=abs) if diffs else 0.0
    mean_old = sum(old["errors"].values()) / len(diffs)
    mean_new = sum(new["errors"].values()) / len(diffs)
    return (
        f"- {label}: {same[0]}/{same[1]} written tensors identical to the baseline's; "
        f"mean relative error {mean_old:.6f} → {mean_new:.6f}, largest per-tensor change "
        f"{worst:+.2e} over {len(diffs)} quantized matrices"
    )


def _cell(mb: float, r: dict) -> str:
    return (
        f"{r['seconds']:.1f} s, {mb / r['seconds']:.1f} MB/s "
        f"(CPU {r['cpu']:.1f} s, {mb / r['cpu']:.1f} MB/s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=BASELINE, help="revision of the old code path")
    ap.add_argument(
        "--threads",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1],
        help="torch thread counts, comma-separated; both sides run at each",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per side (medians reported)")
    ap.add_argument("--skip-calib", action="store_true")
    ap.add_argument("--skip-hqq", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t_all = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    sides = {f"baseline {args.baseline}": baseline_tree(args.baseline), "this tree": REPO}
    smol = smollm2()
    calib = calibration_text()
    jobs = [("family-16L/base", ensure_family_base(), None), ("SmolLM2-135M", smol, None)]
    if not args.skip_calib:
        jobs.append(("SmolLM2-135M --calib", smol, calib))

    rows, checks, best = [], [], []
    for label, model, text in jobs:
        mb = linear_mb(model)
        fastest: dict[str, tuple[float, int]] = {}
        for threads in args.threads:
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            dests = {
                side: OUT / f"{label.replace('/', '-').replace(' ', '')}-{i}"
                for i, side in enumerate(sides)
            }
            # The sides take turns, so a change in the machine's load falls on both. A
            # calibrated run is long enough that one per side is not lost in the noise.
            for _ in range(1 if text else args.repeat):
                for side, root in sides.items():
                    r = quantize(root, model, dests[side], text, threads)
                    runs[side].append(r)
                    print(
                        f"{label} [{side}, {threads} thread(s)]: {r['seconds']:.1f} s, "
                        f"CPU {r['cpu']:.1f} s",
                        flush=True,
                    )
            results = {side: median_run(rs) for side, rs in runs.items()}
            for side, r in results.items():
                if side not in fastest or r["seconds"] < fastest[side][0]:
                    fastest[side] = (r["seconds"], threads)
            old, new = results.values()
            rows.append(
                f"| {label} | {threads} | {mb:.0f} | {_cell(mb, old)} | {_cell(mb, new)} | "
                f"{old['seconds'] / new['seconds']:.2f}× ({old['cpu'] / new['cpu']:.2f}×) | "
                f"{old['bpw']:.3f} / {new['bpw']:.3f} |"
            )
            checks.append(
                error_line(
                    f"{label}, {threads} thread(s)", old, new, identical_tensors(*dests.values())
                )
            )
            for dest in dests.values():
                shutil.rmtree(dest, ignore_errors=True)
        if len(args.threads) > 1:
            (t_old, n_old), (t_new, n_new) = fastest.values()
            best.append(
                f"- {label}, each side at its fastest thread count: baseline {t_old:.1f} s "
                f"({n_old} thread(s)), this tree {t_new:.1f} s ({n_new}): {t_old / t_new:.2f}×"
            )

    hqq_rows = ""
    if not args.skip_hqq:
        hqq_version = ensure_hqq()
        mb = linear_mb(smol)
        for threads in args.threads:
            hqq = hqq_seconds(smol, threads)
            print(f"HQQ {hqq_version}, {threads} thread(s): {hqq['seconds']:.1f} s", flush=True)
            hqq_rows += (
                f"| SmolLM2-135M, HQQ {hqq_version} 2-bit (optimize=True, group 64) | {threads} "
                f"| {mb:.0f} | | {_cell(mb, hqq)} | | |\n"
            )
    wall = time.perf_counter() - t_all
    cmd = "python " + " ".join(
        shlex.quote(a) for a in ["bench/bench_quant_speed.py", *sys.argv[1:]]
    )
    body = (
        "`quantize_model` at the default setting (avg_bits 2.85, group 64; MB/s of bf16 "
        "block-linear weights in) and calibrated (`--calib`: the "
        f"{CALIB_PACKAGE} package's METADATA, its first 8192 tokens), at revision "
        f"{args.baseline} and at this tree, measured in the same run, each in a fresh "
        f"process at each thread count, the median of {args.repeat} "
        "run(s) per side (calibrated: one), the sides taking turns. CPU is the process's user + system "
        "time, which other jobs on the machine disturb less than wall time. Times include reading, "
        "calibration forward passes and writing. family-16L/base is bench/make_family.py's "
        "random 16-layer Llama (hidden 768, intermediate 2048).\n\n"
        f"- Command: `{cmd}`\n- Machine: {machine()} (shared with other jobs: times are "
        "noisy, the two sides run back to back)\n"
        f"- Total wall time: {wall / 60:.1f} min\n\n"
        "| model | threads | MB | baseline: wall (CPU) | this tree: wall (CPU) | speed-up, "
        "baseline / this: wall (CPU) | bits/weight (baseline / this) |\n"
        "|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
        + hqq_rows
        + "\n"
        + "\n".join(best + checks)
        + "\n"
    )
    print(body)
    if not args.no_write:
        write_section("bench_quant_speed", "Quantization speed: before and after", body)


if __name__ == "__main__":
    main()
