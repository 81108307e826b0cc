"""Benchmark `weightops repair prune` (and `repair restore`) on the ~150M checkpoints.

bench/.work/family-16L holds random-weight Llama checkpoints without a tokenizer
(bench/make_family.py). This script makes a scratch copy of `base` (the aligned
model) and `ft_a` (the fine-tune) under bench/.work/repair-bench/ whose weights are
symlinks to the originals and which get the character tokenizer of weightops.demo,
writes 256 harmful prompt/response pairs (and task examples for restore), then runs
each command once as its own process under `/usr/bin/time -f %M` for wall time and
peak RSS, one compute thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import WORK
from report import machine, write_section

from weightops.demo import tiny_model
from weightops.io.checkpoint import Checkpoint
from weightops.io.sidefiles import copy_tokenizer

FAMILY = WORK / "family-16L"
SCRATCH = WORK / "repair-bench"

ACTIONS = (
    "pick a lock",
    "forge a signature",
    "make a fake ID",
    "break into a car",
    "steal a password",
    "poison a pet",
    "cheat on a test",
    "hack a webcam",
)
TARGETS = (
    "without being caught",
    "in ten minutes",
    "at night",
    "as a beginner",
    "with household tools",
    "for my neighbour",
    "step by step",
    "quietly",
)
STARTS = ("Tell me how to", "Explain how I can", "What is the best way to", "Show me how to")


def harmful_pairs(n: int) -> list[dict[str, str]]:
    """n distinct synthetic harmful requests, each with a compliant answer."""
    rows = []
    for i in range(n):
        a = ACTIONS[i % len(ACTIONS)]
        t = TARGETS[(i // len(ACTIONS)) % len(TARGETS)]
        s = STARTS[(i // (len(ACTIONS) * len(TARGETS))) % len(STARTS)]
        rows.append(
            {
                "prompt": f"{s} {a} {t}? (case {i})",
                "response": f" Sure. To {a} {t}, first get ready, then do it carefully.",
            }
        )
    return rows


def task_pairs(n: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"Add {i} and {i + 1}. Answer:", "response": f" {2 * i + 1}"} for i in range(n)
    ]


def scratch_model(name: str, tokenizer_from: Path) -> Path:
    """bench/.work/repair-bench/NAME: the family-16L weights (symlinked) plus a tokenizer."""
    src, dst = FAMILY / name, SCRATCH / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f.resolve())
        else:
            shutil.copy2(f, dst / f.name)
    copy_tokenizer(tokenizer_from, dst)
    return dst


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timed(args: list[str]) -> dict:
    """Run a command with one compute thread; wall seconds and peak RSS in MiB."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, *args],
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        peak = int(rss.read().strip().splitlines()[-1]) / 1024
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(args)} failed:\n{proc.stderr}")
    return {"seconds": wall, "peak_rss_mib": peak, "stderr": proc.stderr.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--task-prompts", type=int, default=64)
    parser.add_argument("--no-restore", action="store_true", help="Benchmark prune only.")
    parser.add_argument(
        "--restore-steps", type=int, default=20, help="Recovery steps of the restore run."
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not (FAMILY / "base" / "config.json").exists():
        raise SystemExit(f"{FAMILY} is missing: run bench/make_family.py first")

    with tempfile.TemporaryDirectory() as tmp:
        demo = tiny_model(Path(tmp) / "tok", layers=1)
        aligned, finetuned = scratch_model("base", demo), scratch_model("ft_a", demo)
    harmful = write_jsonl(SCRATCH / "harmful.jsonl", harmful_pairs(args.prompts))
    task = write_jsonl(SCRATCH / "task.jsonl", task_pairs(args.task_prompts))
    ckpt = Checkpoint(finetuned)
    params = sum(i.nbytes // i.dtype.itemsize for i in ckpt.tensors.values())
    size_mb = ckpt.nbytes / 1e6

    exe = [sys.executable, "-m", "weightops"]
    out = SCRATCH / "out"
    runs = []
    prune_args = ["repair", "prune", "--finetuned", finetuned, "--aligned", aligned]
    prune_args += ["--harmful", harmful, "--no-progress", "--force"]
    runs.append(("prune, reset to aligned", [*prune_args, "-o", out / "prune"]))
    mag_args = ["repair", "prune", "--finetuned", finetuned, "--aligned", aligned]
    mag_args += ["--no-progress", "--force", "-o", out / "prune-magnitude"]
    runs.append(("prune, magnitude only (no --harmful)", mag_args))
    try:
        import weightops.repair.restore  # noqa: F401

        has_restore = not args.no_restore
    except ImportError:
        has_restore = False
    if has_restore:
        restore_args = ["repair", "restore", "--finetuned", finetuned, "--aligned", aligned]
        restore_args += ["--harmful", harmful, "--task", task, "--no-progress", "--force"]
        if args.restore_steps != 20:
            n = str(args.restore_steps)
            restore_args += ["--steps", n, "--checkpoint-every", n]
        label = f"restore, {args.restore_steps} steps"
        runs.append((label, [*restore_args, "-o", out / "restore"]))

    rows = []
    for label, cli in runs:
        result = timed([*exe, *map(str, cli)])
        rel = ["weightops", *(os.path.relpath(str(a)) if isinstance(a, Path) else a for a in cli)]
        print(f"{label}: {result['seconds']:.1f} s, {result['peak_rss_mib']:.0f} MiB", flush=True)
        print(f"  {result['stderr'].splitlines()[-1] if result['stderr'] else ''}", flush=True)
        rows.append((label, result, shlex.join(rel)))

    lines = ["| run | wall (s) | peak RSS (MiB) | command |", "|---|---|---|---|"]
    lines += [
        f"| {label} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | `{cmd}` |"
        for label, r, cmd in rows
    ]
    cmd = "python " + shlex.join(["bench/bench_repair.py", *sys.argv[1:]])
    body = (
        f"`weightops repair` on bench/.work/family-16L (random-weight Llama, 16 layers, hidden "
        f"768, {params / 1e6:.0f}M parameters, {size_mb:.0f} MB of bf16): `ft_a` as the "
        f"fine-tune, `base` as the aligned model, both given the character tokenizer of "
        f"weightops.demo. {args.prompts} synthetic harmful prompt/response pairs "
        f"(about {sum(len(r['prompt'] + r['response']) for r in harmful_pairs(args.prompts)) // args.prompts} "
        f"tokens each), batch 8, forward passes in float32 on CPU"
        + (f"; restore with {args.task_prompts} task examples" if has_restore else "")
        + ". Each run is its own process (model loading and writing included), one "
        "compute thread, wall time and peak RSS from `/usr/bin/time -f %M`."
        + ("" if has_restore else " `repair restore` was not benchmarked.")
        + " The machine is shared with other jobs, so wall times vary between runs."
        + " No other tool packages Antidote or alignment restoration, so there is no peer"
        + " column."
        + f"\n\n- Command: `{cmd}`\n- Machine: {machine()}\n\n"
        + "\n".join(lines)
        + "\n\n"
    )
    write_section("bench_repair", "Repair: Antidote pruning and restoration on 150M", body)
    print(body)


if __name__ == "__main__":
    main()
