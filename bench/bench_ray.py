"""The Ray executor against the local one, side by side in one run.

Three configurations, each in its own child process kept for the whole run, take
turns job by job (the elementwise merges in three rounds, the median kept), so that
the load of a shared machine falls on them alike:

- local: `--executor local` (RunOptions(executor="local")), one compute thread;
- Ray with 1 worker and with 2 workers: a local Ray instance started with that many
  CPUs (ray.init(num_cpus=N)), `--executor ray`, one CPU and one thread per task.

Jobs: linear and task_arithmetic (elementwise: what Ray costs where there is nothing
to parallelise but I/O and arithmetic), TSV-M (one SVD-heavy task per matrix) of the
16-layer family (bench/make_family.py, ~150M parameters per model, three fine-tunes),
and calibrated quantization (`quantize --calib`, avg_bits 2.85) of SmolLM2-135M (the
family has no tokenizer to calibrate with), on the pydantic package's METADATA. Each
configuration first runs one untimed linear merge, so Ray's worker processes have
started and imported torch and the page cache holds the inputs; that warm-up's time
is reported apart. Every output is hashed: all three configurations must write the
same bytes.

Writes the `bench_ray` section of BENCHMARKS.md and the per-matrix TSV-M costs that
docs/scale.md's 70B estimate uses.

    python bench/bench_ray.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import ensure_family, write_recipe
from bench_quant_speed import calibration_text
from bench_tsv import write_recipe as tsv_recipe
from peers import WORK
from real_model import smollm2
from report import REPO, machine, write_section

OUT = WORK / "ray"
CONFIGS = {"local": 0, "Ray, 1 worker": 1, "Ray, 2 workers": 2}

# A child serves one configuration: it reads jobs as JSON lines and answers each with
# its seconds and output hash, so the configurations can take turns job by job.
CHILD = r"""
import hashlib, json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from weightops.engine.plan import build_plan
from weightops.engine.run import RunOptions, execute
from weightops.quant.model import quantize_model
from weightops.recipe_multi import load_recipe_file

workers, out = int(sys.argv[1]), Path(sys.argv[2])
executor = "ray" if workers else "local"
start = time.perf_counter()
if workers:
    import ray
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING")
print(json.dumps({"ray start": time.perf_counter() - start}), flush=True)


def digest(folder):
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


for line in sys.stdin:
    label, kind, source, extra = json.loads(line)
    dest = out / label.replace(" ", "_")
    start = time.perf_counter()
    if kind == "merge":
        recipe = load_recipe_file(Path(source)).steps[0].recipe
        plan = build_plan(recipe, Path(source).parent)
        options = RunOptions(device="cpu", threads=1, progress=False, force=True, executor=executor)
        execute(plan, dest, options)
    else:
        quantize_model(source, dest, calib=extra, force=True, executor=executor)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "digest": digest(dest)}), flush=True)
"""


class Child:
    """One configuration's process (and its Ray instance)."""

    def __init__(self, workers: int, threads: int) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            # Ray starts its workers at niceness 15 so its own daemons stay responsive;
            # on a machine shared with other jobs that alone slows them several tens of
            # percent. At the driver's priority they compete as a local run does, as on
            # dedicated nodes where nothing else runs.
            "RAY_worker_niceness": "0",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(workers), str(OUT / f"workers-{workers}")],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.start = self._answer()["ray start"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child exited {self.proc.wait()}")
        return json.loads(line)

    def run(self, job: tuple) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def per_matrix_costs(family: dict[str, Path]) -> dict[str, float]:
    """TSV-M seconds of one matrix of each shape (one thread, tensors in memory)."""
    import torch

    from weightops.io.checkpoint import Checkpoint
    from weightops.io.safetensors_file import FileReader
    from weightops.merge import get_method

    def read(folder: Path, name: str) -> torch.Tensor:
        with FileReader() as reader:
            return reader.read(Checkpoint(folder).tensors[name])

    torch.set_num_threads(1)
    spec = get_method("tsv_m")
    params = {p.name: p.default for p in spec.params.values()}
    params.update({"lambda": 1.0, "weight": [1.0] * 3})
    out = {}
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ):
        base = read(family["base"], name).float()
        fts = [read(family[k], name).float() for k in ("ft_a", "ft_b", "ft_c")]
        start = time.perf_counter()
        spec([t.clone() for t in fts], base.clone(), params)
        out[f"{list(base.shape)}"] = time.perf_counter() - start
    return out


# Llama-3-70B: hidden 8192, intermediate 28672, 80 blocks, 8 KV heads of 128, 128256 tokens.
SHAPES_70B = {
    "q_proj, o_proj": ((8192, 8192), 2 * 80),
    "k_proj, v_proj": ((1024, 8192), 2 * 80),
    "gate_proj, up_proj, down_proj": ((28672, 8192), 3 * 80),
    "embed_tokens, lm_head": ((128256, 8192), 2),
}
TASKS = 3  # fine-tunes merged


def estimate(costs: dict[str, float], nodes: list[int], cores: int) -> str:
    """docs/scale.md's table: TSV-M of a 70B model from the measured per-matrix costs.

    A thin SVD of an m × n matrix costs ∝ m·n·min(m, n); the polar factors (eigen-
    decompositions of min(m, n)-square Grams) scale the same way, so each 70B shape's
    time is the measured time of the family's largest matrix (2048 × 768) scaled by
    that product."""
    ref_shape, ref_s = (2048, 768), costs["[2048, 768]"]

    def work(m: int, n: int) -> float:
        return m * n * min(m, n)

    rows, total, longest = [], 0.0, 0.0
    for label, ((m, n), count) in SHAPES_70B.items():
        each = ref_s * work(m, n) / work(*ref_shape)
        total += each * count
        longest = max(longest, each)
        mem = (TASKS + 4) * m * n * 4  # fp32: the inputs, the base, deltas and factors
        rows.append(
            f"| {label} | {m} × {n} | {count} | {each / 60:.1f} min | {each * count / 3600:.1f} h "
            f"| {mem / 2**30:.1f} GiB |"
        )
    table = (
        "| matrices | shape | count | one task, 1 thread | all, core-hours | peak per task |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
    )
    table += f"Total: {total / 3600:.0f} core-hours; the longest task {longest / 3600:.1f} h.\n\n"
    table += (
        "| nodes × cores | wall time, 1 thread per task | 8 threads per task, if they scaled "
        "perfectly |\n|---|---|---|\n"
    )
    for n in nodes:
        # The cores' share of the total, but never less than the longest task.
        one = max(total / (n * cores), longest)
        eight = max(total / (n * cores), longest / 8)
        table += f"| {n} × {cores} | {one / 3600:.1f} h | {eight / 3600:.1f} h |\n"
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument(
        "--report",
        action="store_true",
        help="write the section again from the last run's results.json and stop",
    )
    ap.add_argument(
        "--estimate",
        action="store_true",
        help="print docs/scale.md's 70B table from the last run's results.json and stop",
    )
    ap.add_argument("--threads", type=int, default=1, help="OMP threads of every process")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the elementwise merges")
    ap.add_argument(
        "--only",
        help="comma-separated jobs to run again (e.g. linear,task_arithmetic); the other "
        "rows keep the last run's results",
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.estimate:
        costs = json.loads((OUT / "results.json").read_text())["per_matrix"]
        print(estimate(costs, [1, 2, 4, 8, 16], 64))
        return
    if args.report:
        finish(ensure_family(args.layers), args, 0.0)
        return
    t_all = time.perf_counter()
    family = ensure_family(args.layers)
    root = OUT / "recipes"
    jobs = [
        ("warm-up linear", "merge", str(write_recipe("linear", family, args.layers, "-w")), None),
        ("linear", "merge", str(write_recipe("linear", family, args.layers)), None),
        (
            "task_arithmetic",
            "merge",
            str(write_recipe("task_arithmetic", family, args.layers)),
            None,
        ),
        ("TSV-M", "merge", str(tsv_recipe(family, "full", root)), None),
        ("quantize --calib", "quantize", str(smollm2()), str(calibration_text())),
    ]
    if args.only:
        wanted = {"warm-up linear", *args.only.split(",")}
        jobs = [job for job in jobs if job[0] in wanted]
    children = {label: Child(workers, args.threads) for label, workers in CONFIGS.items()}
    results: dict[str, dict] = {c: {"ray start": ch.start} for c, ch in children.items()}
    if args.only:
        last = json.loads((OUT / "results.json").read_text())["runs"]
        results = {c: last[c] | results[c] for c in children}
    try:
        for job in jobs:
            # Elementwise merges take seconds: several rounds, the median kept.
            rounds = args.repeat if job[0] in ("linear", "task_arithmetic") else 1
            times: dict[str, list[float]] = {c: [] for c in children}
            for _ in range(rounds):
                for config, child in children.items():
                    answer = child.run(job)
                    times[config].append(answer["seconds"])
                    results[config][job[0] + " digest"] = answer["digest"]
                    print(f"{job[0]} [{config}]: {answer['seconds']:.1f} s", flush=True)
            for config in children:
                results[config][job[0]] = statistics.median(times[config])
                results[config][job[0] + " rounds"] = times[config]
    finally:
        for child in children.values():
            child.close()
    saved = json.loads((OUT / "results.json").read_text()) if args.only else {}
    saved["runs"] = results
    saved.setdefault("repeat", args.repeat)
    if args.only:
        saved["rerun"] = {
            "only": args.only,
            "repeat": args.repeat,
            "seconds": time.perf_counter() - t_all,
        }
    (OUT / "results.json").write_text(json.dumps(saved, indent=2))
    finish(family, args, time.perf_counter() - t_all)


def finish(family: dict[str, Path], args: argparse.Namespace, seconds: float) -> None:
    """Measure the per-matrix costs (unless the results have them) and write the section
    from the runs in results.json."""
    saved = json.loads((OUT / "results.json").read_text())
    results = saved["runs"]
    costs = saved.get("per_matrix") or per_matrix_costs(family)
    print("per-matrix TSV-M seconds:", json.dumps(costs), flush=True)
    saved["per_matrix"] = costs
    saved.setdefault("seconds", seconds)
    (OUT / "results.json").write_text(json.dumps(saved, indent=2))
    if not args.no_write:
        write_section(
            "bench_ray",
            "Ray executor: local vs Ray with 1 and 2 workers",
            report(results, costs, args, saved),
        )


def report(results: dict, costs: dict, args: argparse.Namespace, saved: dict) -> str:
    local = results["local"]
    total = saved["seconds"]
    labels = ["linear", "task_arithmetic", "TSV-M", "quantize --calib"]
    rows = []
    for label in labels:
        cells = [f"{local[label]:.1f}"]
        for cfg in list(CONFIGS)[1:]:
            r = results[cfg]
            cells.append(f"{r[label]:.1f} ({local[label] / r[label]:.2f}×)")
        same = len({results[c][label + " digest"] for c in CONFIGS}) == 1
        rows.append(f"| {label} | {' | '.join(cells)} | {'yes' if same else 'NO'} |")
    warm = ", ".join(f"{c} {results[c]['warm-up linear']:.1f} s" for c in CONFIGS)
    # Seconds-long merges swing with the machine's load: every round is shown, and
    # Ray's overhead is taken from the medians.
    spread = ""
    for label in ("linear", "task_arithmetic"):
        rounds = "; ".join(
            f"{c} " + ", ".join(f"{x:.1f}" for x in results[c].get(label + " rounds", []))
            for c in CONFIGS
        )
        extra = ", ".join(
            f"{c} {100 * (results[c][label] / local[label] - 1):+.0f} %" for c in list(CONFIGS)[1:]
        )
        spread += f"- {label}: Ray's time over local's {extra} (rounds: {rounds})\n"
    rerun = saved.get("rerun")
    if rerun:
        spread += (
            f"- Rows {rerun['only']} are from a later run, "
            f"`python bench/bench_ray.py --only {rerun['only']} --repeat {rerun['repeat']}` "
            f"({rerun['seconds'] / 60:.1f} min)\n"
        )
    matrices = ", ".join(f"{shape} {s:.2f} s" for shape, s in costs.items())
    return (
        f"Local executor against `--executor ray` on a local Ray instance with 1 and 2 "
        f"worker CPUs, each configuration in its own process, one torch thread per process "
        f"and per task. Merges of the {args.layers}-layer family (bench/make_family.py, "
        "three bf16 fine-tunes of a ~150M-parameter base; TSV-M exact SVD, λ = 1, float32); "
        "calibrated quantization of SmolLM2-135M (avg_bits 2.85, group 64, 8192 tokens of "
        "the pydantic package's METADATA). Seconds of wall time; in brackets the speed-up "
        "over local (below 1: Ray's overhead). Ray's workers run at the driver's priority "
        "(`RAY_worker_niceness=0`; Ray's default of 15 would hand the shared machine's "
        "cores to the other jobs first).\n\n"
        f"- Command: `python bench/bench_ray.py --repeat {saved.get('repeat', 3)}`\n"
        f"- Machine: {machine()} (shared with other jobs: the configurations take turns "
        "job by job, so compare within a row)\n"
        f"- Total wall time: {total / 60:.1f} min\n\n"
        "| job | local | Ray, 1 worker | Ray, 2 workers | same bytes |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n" + spread + "\n"
        f"Warm-up (first merge of each process: Ray's workers start and import torch): "
        f"{warm}.\n\n"
        f"TSV-M of one matrix, three fine-tunes, one thread, tensors in memory: {matrices} "
        "(the costs docs/scale.md scales to 70B).\n\n"
    )


if __name__ == "__main__":
    main()
