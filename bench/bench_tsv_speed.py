"""TSV-M against the SVDs it needs and against fusion-bench's implementation.

One run on the ~150M family (bench/make_family.py) with its three fine-tunes, every
part pinned to one thread (torch.set_num_threads(1), OMP_NUM_THREADS=1):

1. weightops TSV-M end to end: `weightops merge --threads 1` as a child process
   (reading, merging and writing the checkpoint; wall time, peak RSS);
2. the same merge in this process, tensor by tensor on tensors already in memory
   (the method's compute alone);
3. the bare torch.linalg.svd calls the paper's algorithm needs, timed alone: for every
   2-D matrix one thin SVD per task (on the matrix's tall orientation, as weightops
   runs it) and one SVD of each of the two stacks whose polar factors it takes, Û
   (m × Tk) and V̂ᵀ (Tk × n);
4. fusion-bench's TSV-M (`compute_and_sum_svd_mem_reduction` from its
   task_singular_vector/utils/TSVM_utils.py, loaded by path from the package installed
   in bench/.work/venv-fusionbench) on the same float32 task vectors, in a child
   process; its merged task vectors are compared with weightops' (2).

Writes the `bench_tsv_speed` section of BENCHMARKS.md.

    python bench/bench_tsv_speed.py
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import ensure_family, load_tensor_index, measure, read
from bench_tsv import write_recipe
from make_family import FINE_TUNES
from peers import WORK
from report import BENCHMARKS_MD, machine, write_section

FUSION_VENV = WORK / "venv-fusionbench"
FUSION_UTILS = "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py"

# Run by the fusion-bench virtualenv's python: argv = out_file, base dir, fine-tune dirs.
# The utils module imports only torch and one type alias from its package, so it is
# loaded by path with that alias stubbed, without the package's heavy __init__.
FUSION_CHILD = r"""
import glob, importlib.util, sys, time, types
import torch
from safetensors.torch import load_file

torch.set_num_threads(1)
alias = types.ModuleType("fusion_bench.utils.type")
alias.StateDictType = dict
for name in ("fusion_bench", "fusion_bench.utils"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["fusion_bench.utils.type"] = alias
spec = importlib.util.spec_from_file_location("TSVM_utils", sys.argv[1])
utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(utils)

def load(d):
    sd = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        sd.update(load_file(f))
    return sd

base = {k: v.float() for k, v in load(sys.argv[3]).items()}
tvs = []
for d in sys.argv[4:]:
    ft = load(d)
    tvs.append({k: ft[k].float() - base[k] for k in base})
    del ft
del base
start = time.perf_counter()
merged = utils.compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
print(f"SECONDS {time.perf_counter() - start:.3f}", flush=True)
torch.save(merged, sys.argv[2])  # safetensors writing needs numpy
"""


def fusion_version() -> str:
    out = subprocess.run(
        [str(FUSION_VENV / "bin" / "pip"), "show", "fusion-bench"], capture_output=True, text=True
    )
    version = next(
        (ln.split()[-1] for ln in out.stdout.splitlines() if ln.startswith("Version")), "?"
    )
    return f"fusion-bench {version}"


def run_fusion(family: dict[str, Path], out_file: Path) -> float:
    """fusion-bench's TSV-M compute time (s) on the family's task vectors."""
    utils = next(FUSION_VENV.glob(f"lib/python*/site-packages/{FUSION_UTILS}"))
    child = WORK / "tsv_fusion_child.py"
    child.write_text(FUSION_CHILD)
    cmd = [str(FUSION_VENV / "bin" / "python"), str(child), str(utils), str(out_file)]
    cmd += [str(family["base"]), *(str(family[n]) for n in FINE_TUNES)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"fusion-bench run failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SECONDS"))
    return float(line.split()[1])


def load_model(idx: dict[str, Path], name: str) -> torch.Tensor:
    return read(idx[name], name).float()


def in_process(family: dict[str, Path]) -> tuple[float, float, dict[str, torch.Tensor]]:
    """weightops' TSV-M on in-memory tensors: (compute seconds, bare-SVD seconds,
    merged task vector per tensor)."""
    from weightops.merge import get_method

    spec = get_method("tsv_m")
    idx = {n: load_tensor_index(family[n]) for n in ("base", *FINE_TUNES)}
    merged, compute, bare = {}, 0.0, 0.0
    for name in idx["base"]:
        base = load_model(idx["base"], name)
        fts = [load_model(idx[n], name) for n in FINE_TUNES]
        params = {"weight": [1.0] * len(fts), "lambda": 1.0, "svd": "full"}
        start = time.perf_counter()
        out = spec([f.clone() for f in fts], base.clone(), params, name=name)
        compute += time.perf_counter() - start
        merged[name] = out - base
        if base.dim() == 2:
            bare += bare_svds([f - base for f in fts])
    return compute, bare, merged


def bare_svds(deltas: list[torch.Tensor]) -> float:
    """Seconds of the torch.linalg.svd calls TSV-M needs for one matrix (see module doc)."""
    m, n = deltas[0].shape
    k = min(m, n) // len(deltas)
    seconds, us, vhs = 0.0, [], []
    for d in deltas:
        tall = d.mT if m < n else d
        start = time.perf_counter()
        u, _, vh = torch.linalg.svd(tall, full_matrices=False)
        seconds += time.perf_counter() - start
        u, vh = (vh.mT, u.mT) if m < n else (u, vh)
        us.append(u[:, :k])
        vhs.append(vh[:k])
    for stack in (torch.cat(us, dim=1), torch.cat(vhs, dim=0)):
        start = time.perf_counter()
        torch.linalg.svd(stack, full_matrices=False)
        seconds += time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--no-fusion", action="store_true", help="skip fusion-bench")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    family = ensure_family(args.layers)
    root = WORK / "tsv-speed"
    recipe = write_recipe(family, "full", root)
    out = root / "out"
    cmd = [sys.executable, "-m", "weightops", "merge", str(recipe), "-o", str(out)]
    cmd += ["--force", "--threads", "1"]
    print(shlex.join(cmd), flush=True)
    cli = measure(cmd, out, root / "cli.log")
    compute, bare, ours = in_process(family)
    print(f"in-process {compute:.1f} s, bare SVDs {bare:.1f} s", flush=True)
    rows = [
        f"| weightops `merge` end to end (I/O included) | {cli.seconds:.1f} "
        f"| {cli.seconds / bare:.2f} |",
        f"| weightops TSV-M compute, tensors in memory | {compute:.1f} | {compute / bare:.2f} |",
        f"| bare torch.linalg.svd calls it needs | {bare:.1f} | 1.00 |",
    ]
    notes = []
    if args.no_fusion or not FUSION_VENV.exists():
        notes.append("fusion-bench was not run (no bench/.work/venv-fusionbench).")
    else:
        theirs_file = root / "fusion-bench.pt"
        fusion = run_fusion(family, theirs_file)
        theirs = torch.load(theirs_file)
        worst_abs = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
        worst_rel = max(
            float((ours[k] - theirs[k]).norm() / ours[k].norm().clamp_min(1e-30)) for k in ours
        )
        rows.append(
            f"| {fusion_version()} TSV-M compute, tensors in memory | {fusion:.1f} "
            f"| {fusion / bare:.2f} |"
        )
        notes.append(
            f"weightops vs fusion-bench merged task vectors (float32), worst tensor: "
            f"max |Δ| {worst_abs:.2e}, ‖Δ‖_F / ‖update‖_F {worst_rel:.2e}."
        )
    lines = [
        f"Machine: {machine()}. TSV-M (λ = 1, exact SVD) of the {args.layers}-layer family "
        "with its three fine-tunes, float32, everything on one thread. The bare SVDs are, "
        "per 2-D matrix, one thin SVD per task (tall orientation) plus one SVD of each "
        "stack Û (m × Tk) and V̂ᵀ (Tk × n), as the paper writes the polar factors; "
        "weightops takes those two from the eigendecomposition of their small Gram "
        f"matrices instead. End-to-end peak RSS {cli.peak_mib:.0f} MiB.",
        "",
        "| run | seconds | × bare SVDs |",
        "|---|---|---|",
        *rows,
        "",
        *notes,
    ]
    command = shlex.join(["python", "bench/bench_tsv_speed.py", *sys.argv[1:]])
    lines += ["", "```", command, "```", ""]
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_write:
        write_section("bench_tsv_speed", "TSV-M: against the bare SVDs and fusion-bench", body)
        print(f"updated {BENCHMARKS_MD}")


if __name__ == "__main__":
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    main()
