"""TSV-M on the ~150M synthetic Llama family: exact vs randomized truncated SVD.

Both runs go through `weightops merge` as child processes (wall time and peak RSS
from GNU time, as in bench_merge.py); the two outputs are then compared tensor by
tensor. Writes the `bench_tsv` section of BENCHMARKS.md.

    python bench/bench_tsv.py
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import ensure_family, load_tensor_index, measure, read
from make_family import FINE_TUNES, INTERMEDIATE, VOCAB
from peers import WORK
from report import BENCHMARKS_MD, machine, write_section

# What the difference between the two columns means on this family.
FLAT_SPECTRUM = (
    "The family's fine-tunes are sparse random noise with a flat spectrum, no low-rank "
    "structure: the worst case for a randomized SVD, whose rank-k parts are near-optimal "
    "in spectral norm but span other directions than the exact ones, so the truncated "
    "merge differs from the exact one by about 60–90% of the update here. On task "
    "vectors with a decaying spectrum the two agree within the bound in tsv_m's "
    "docstring (tests/test_tsv.py); the exact SVD is the default."
)

MODES = ("full", "truncated")


def write_recipe(family: dict[str, Path], svd: str, root: Path) -> Path:
    recipe = {
        "merge_method": "tsv_m",
        "base_model": str(family["base"]),
        "models": [{"model": str(family[n])} for n in FINE_TUNES],
        "parameters": {"lambda": 1.0, "svd": svd},
        "dtype": "float32",
    }
    path = root / f"tsv_m-{svd}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def kind(name: str) -> str:
    for part in ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj"):
        if part in name:
            return part
    for part in ("gate_proj", "up_proj", "down_proj"):
        if part in name:
            return part
    return "1-D (norms)"


def compare(out_a: Path, out_b: Path) -> dict[str, tuple[float, float]]:
    """Per tensor kind: worst max |a − b| and worst ‖a − b‖_F / ‖a‖_F, with `a` the
    exact (full SVD) output."""
    idx_a, idx_b = load_tensor_index(out_a), load_tensor_index(out_b)
    assert idx_a.keys() == idx_b.keys()
    worst: dict[str, tuple[float, float]] = {}
    for name in sorted(idx_a):
        a, b = read(idx_a[name], name).double(), read(idx_b[name], name).double()
        diff = (a - b).abs()
        max_abs = float(diff.max())
        rel = float(diff.norm() / a.norm().clamp_min(1e-30))
        k = kind(name)
        old = worst.get(k, (0.0, 0.0))
        worst[k] = (max(old[0], max_abs), max(old[1], rel))
    return worst


def delta_compare(out_a: Path, out_b: Path, base: Path) -> dict[str, float]:
    """Per tensor kind: worst ‖a − b‖_F / ‖a − base‖_F, the difference as a share of
    the merged update itself."""
    idx_a, idx_b, idx_0 = (load_tensor_index(p) for p in (out_a, out_b, base))
    worst: dict[str, float] = {}
    for name in sorted(idx_a):
        a, b = read(idx_a[name], name).double(), read(idx_b[name], name).double()
        update = a - read(idx_0[name], name).double()
        rel = float((a - b).norm() / update.norm().clamp_min(1e-30))
        worst[kind(name)] = max(worst.get(kind(name), 0.0), rel)
    return worst


def direct_compare(family: dict[str, Path], layer: int, threads: int) -> list[str]:
    """Full vs truncated on one decoder layer's matrices, by calling the method in this
    process: a check that does not depend on the whole-model runs finishing."""
    from weightops.merge import get_method

    torch.set_num_threads(threads)
    spec = get_method("tsv_m")
    idx = {n: load_tensor_index(family[n]) for n in ("base", *FINE_TUNES)}
    names = [n for n in idx["base"] if f"layers.{layer}." in n and n.endswith("proj.weight")]
    rows = []
    for name in names:
        base = read(idx["base"][name], name).float()
        fts = [read(idx[n][name], name).float() for n in FINE_TUNES]
        outs, secs = {}, {}
        for svd in MODES:
            params = {"weight": [1.0] * len(fts), "lambda": 1.0, "svd": svd}
            start = time.perf_counter()
            outs[svd] = spec([f.clone() for f in fts], base.clone(), params, name=name)
            secs[svd] = time.perf_counter() - start
        diff = (outs["full"] - outs["truncated"]).double()
        update = (outs["full"] - base).double()
        rows.append(
            f"| {name} | {list(base.shape)} | {secs['full']:.1f} | {secs['truncated']:.1f} "
            f"| {float(diff.abs().max()):.2e} | {float(diff.norm() / update.norm()):.2e} |"
        )
        print(rows[-1], flush=True)
    return [
        "",
        f"Layer {layer}'s matrices merged in one process (fp32, before the bf16 rounding "
        f"of the outputs, {threads} threads): seconds per matrix and the difference "
        "truncated − full, as max |Δ| and as a share of the merged update's Frobenius norm.",
        "",
        "| tensor | shape | full (s) | truncated (s) | max abs diff | ‖Δ‖_F / ‖update‖_F |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=420, help="seconds per merge")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    family = ensure_family(args.layers)
    root = WORK / "tsv"
    runs, outs, notes = {}, {}, []
    for svd in MODES:
        recipe = write_recipe(family, svd, root)
        out = root / f"out-{svd}"
        cmd = [
            sys.executable,
            "-m",
            "weightops",
            "merge",
            str(recipe),
            "-o",
            str(out),
            "--force",
            "--threads",
            str(args.threads),
        ]
        print(f"{svd}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        try:
            runs[svd] = measure_with_timeout(cmd, out, root / f"{svd}.log", args.timeout)
            outs[svd] = out
        except subprocess.TimeoutExpired:
            notes.append(f"{svd} SVD did not finish within {args.timeout:.0f} s")
            print(notes[-1], flush=True)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)

    lines = [
        f"Machine: {machine()}. TSV-M (λ = 1) of the {args.layers}-layer family "
        f"(hidden 768, MLP {INTERMEDIATE}, vocabulary {VOCAB}, bf16) with its three "
        f"fine-tunes: k = ⌊r/3⌋ triplets per task (256 of 768; 85 of 256 for k/v), "
        f"`--threads {args.threads}`. Embeddings and lm_head ({VOCAB} × 768) go through "
        "the SVD like every matrix.",
        "",
        "| svd | wall time (s) | peak RSS (MiB) |",
        "|---|---|---|",
    ]
    for svd in MODES:
        if svd in runs:
            lines.append(f"| {svd} | {runs[svd].seconds:.1f} | {runs[svd].peak_mib:.0f} |")
        else:
            lines.append(f"| {svd} | > {args.timeout:.0f} (stopped) | — |")
    if len(outs) == 2:
        worst = compare(outs["full"], outs["truncated"])
        upd = delta_compare(outs["full"], outs["truncated"], family["base"])
        lines += [
            "",
            "Truncated vs full output, worst tensor of each kind (bf16 outputs): max |Δ|, "
            "‖Δ‖_F / ‖θ_full‖_F, and ‖Δ‖_F / ‖θ_full − θ_base‖_F (share of the merged update).",
            "",
            "| tensor kind | max abs diff | rel. to weights | rel. to update |",
            "|---|---|---|---|",
        ]
        for k, (max_abs, rel) in worst.items():
            lines.append(f"| {k} | {max_abs:.2e} | {rel:.2e} | {upd[k]:.2e} |")
    lines += direct_compare(family, 0, args.threads)
    command = shlex.join(["python", "bench/bench_tsv.py", *sys.argv[1:]])
    lines += ["", *notes, FLAT_SPECTRUM, "", "```", command, "```", ""]
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_write:
        write_section("bench_tsv", "TSV-M: exact vs truncated SVD", body)
        print(f"updated {BENCHMARKS_MD}")


def measure_with_timeout(cmd: list[str], out: Path, log: Path, timeout: float):
    """bench_merge.measure with a time limit: the child is stopped past `timeout`."""
    full = ["timeout", "--signal=TERM", f"{int(timeout)}", *cmd]
    try:
        return measure(full, out, log)
    except RuntimeError as e:
        if "exited 124" in str(e):
            raise subprocess.TimeoutExpired(cmd, timeout) from e
        raise


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
