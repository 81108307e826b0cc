"""Benchmark `weightops repair prune` and `repair restore` on the ~150M checkpoints,
before and after a revision, against a plain forward pass over the same data.

bench/.work/family-16L holds random-weight Llama checkpoints without a tokenizer
(bench/make_family.py). This script makes a scratch copy of `base` (the aligned
model) and `ft_a` (the fine-tune) under bench/.work/repair-bench/ whose weights are
symlinks to the originals and which get the character tokenizer of weightops.demo,
writes 256 harmful prompt/response pairs (and task examples for restore), and
unpacks the `--before` revision's weightops into bench/.work/repair-before/. Then,
one after the other, each as its own process under `/usr/bin/time -f %M` (wall time
and peak RSS, one compute thread): a plain forward pass of the fine-tune (float32,
logits included) over the harmful pairs, batch 8, as `repair prune` reads them; and
each command with the revision's code and with this tree's. The outputs of the two
trees are compared tensor by tensor. With `--no-prune` only restore runs (no plain
forward pass), and its table goes to a section of its own, bench_repair_restore.
"""

from __future__ import annotations

import argparse
import hashlib
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
from repair_report import write_report

from weightops.demo import tiny_model
from weightops.io.checkpoint import Checkpoint
from weightops.io.sidefiles import copy_tokenizer

FAMILY = WORK / "family-16L"
SCRATCH = WORK / "repair-bench"
BEFORE = WORK / "repair-before"
RESULTS = SCRATCH / "results.json"
REPO = Path(__file__).resolve().parent.parent
# The revision before batched gathering and the lean restore.
BEFORE_REV = "769cb4f"

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


def tokens_per_pair(n: int) -> int:
    """Tokens of a harmful pair on average (the character tokenizer: one per character)."""
    return sum(len(r["prompt"] + r["response"]) for r in harmful_pairs(n)) // n


def task_pairs(n: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"Add {i} and {i + 1}. Answer:", "response": f" {2 * i + 1}"} for i in range(n)
    ]


def scratch_model(name: str, tokenizer_from: Path) -> Path:
    """bench/.work/repair-bench/NAME: the family-16L weights (symlinked) plus a tokenizer."""
    src, dst = FAMILY / name, SCRATCH / name
    if (dst / "config.json").exists() and (dst / "tokenizer_config.json").exists():
        return dst  # made by an earlier run (possibly one still running)
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


def timed(args: list[str], cwd: Path) -> dict:
    """Run a command with one compute thread, importing weightops from `cwd`; wall
    seconds and peak RSS in MiB."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(cwd))
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        peak = int(rss.read().strip().splitlines()[-1]) / 1024
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(args)} failed:\n{proc.stderr}")
    return {"seconds": wall, "peak_rss_mib": peak, "stderr": proc.stderr.strip()}


def unpack(rev: str) -> Path:
    """bench/.work/repair-before: the weightops package of revision `rev`."""
    if BEFORE.exists():
        shutil.rmtree(BEFORE)
    BEFORE.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "weightops"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(BEFORE)], input=archive, check=True)
    return BEFORE


def digest(folder: Path) -> str:
    """A hash of every tensor of a folder's safetensors files (names, dtypes, bytes)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in sorted(st.keys()):
                t = st.get_tensor(k)
                h.update(f"{k}:{t.dtype}:{list(t.shape)}".encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def plain_forward(folder: Path, data: Path, batch_size: int) -> None:
    """The reference: the fine-tune loaded in float32, run over the harmful pairs
    (prompt + response) as prune batches them, logits included, nothing gathered."""
    from transformers import AutoTokenizer

    from weightops.compat import causal_lm
    from weightops.demo import quiet_transformers
    from weightops.repair.data import batches, context_length, load_examples

    torch.set_num_threads(1)
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = causal_lm(folder, torch.float32).eval()
    examples = load_examples(data)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches(
            examples, tokenizer, batch_size=batch_size, max_length=context_length(model)
        ):
            model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,
            )
    sys.stderr.write(f"forward passes: {time.perf_counter() - start:.1f} s\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--task-prompts", type=int, default=64)
    parser.add_argument("--no-restore", action="store_true", help="Benchmark prune only.")
    parser.add_argument(
        "--restore-steps", type=int, default=20, help="Recovery steps of the restore run."
    )
    parser.add_argument(
        "--before", default=BEFORE_REV, help="Revision to compare with (git rev; '' for none)."
    )
    parser.add_argument(
        "--earlier",
        type=Path,
        action="append",
        help="Add the runs this one did not make from an earlier run's results.json "
        "(marked † in the table).",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Write the table again from the last run's measurements (results.json).",
    )
    parser.add_argument(
        "--no-prune",
        action="store_true",
        help="Benchmark restore only (its table goes to the bench_repair_restore section).",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="Where to save the runs.")
    parser.add_argument("--note", default="", help="A sentence to add to the table's text.")
    parser.add_argument("--forward", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.forward:
        plain_forward(*args.forward, batch_size=8)
        return
    if args.report_only:
        saved = json.loads(args.results.read_text())
        argv = saved["args"].get("earlier_argv") or []
        saved["args"]["earlier_argv"] = [argv] if isinstance(argv, str) else argv
        for path in args.earlier or ():
            earlier = json.loads(path.read_text())
            have = {(label, t) for label, t, _ in saved["results"]}
            for label, t, r in earlier["results"]:
                if (label, t) not in have:
                    saved["results"].append([label, t, {**r, "earlier": True}])
                    saved["commands"].setdefault(label, earlier["commands"][label])
                    if label not in saved["jobs"]:
                        saved["jobs"].append(label)
            saved["trees"] = [
                t for t in ("before", "after") if t in saved["trees"] + earlier["trees"]
            ]
            saved["args"]["earlier_argv"].append(" ".join(earlier["args"]["argv"]))
        saved["args"]["note"] = args.note
        write_report(saved, tokens_per_pair(saved["args"]["prompts"]))
        return
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
    fp32_mib = params * 4 / 2**20
    trees = [("after", REPO)]
    if args.before:
        trees.insert(0, ("before", unpack(args.before)))

    exe = [sys.executable, "-m", "weightops"]
    out = SCRATCH / "out"
    jobs: list[tuple[str, list]] = []
    prune_args = ["repair", "prune", "--finetuned", finetuned, "--aligned", aligned]
    prune_args += ["--harmful", harmful, "--no-progress", "--force"]
    if not args.no_prune:
        jobs.append(("prune, reset to aligned", prune_args))
    mag_args = ["repair", "prune", "--finetuned", finetuned, "--aligned", aligned]
    mag_args += ["--no-progress", "--force"]
    if not args.no_prune:
        jobs.append(("prune, magnitude only (no --harmful)", mag_args))
    if not args.no_restore:
        restore_args = ["repair", "restore", "--finetuned", finetuned, "--aligned", aligned]
        restore_args += ["--harmful", harmful, "--task", task, "--no-progress", "--force"]
        if args.restore_steps != 20:
            n = str(args.restore_steps)
            restore_args += ["--steps", n, "--checkpoint-every", n]
        jobs.append((f"restore, {args.restore_steps} steps", restore_args))

    def rel(a: object) -> str:
        return os.path.relpath(str(a), REPO) if isinstance(a, Path) else str(a)

    forward_cli = [sys.executable, str(Path(__file__).resolve()), "--forward", finetuned, harmful]
    forward = None
    if not args.no_prune:
        forward = timed([str(a) for a in forward_cli], REPO)
        print(f"plain forward: {forward['seconds']:.1f} s, {forward['peak_rss_mib']:.0f} MiB")
        print(f"  {forward['stderr'].splitlines()[-1]}", flush=True)
    results: dict[tuple[str, str], dict] = {}
    commands: dict[str, str] = {}
    for label, cli in jobs:
        for tree_label, tree in trees:
            dest = (
                out
                / f"{label.split(',')[0]}-{'magnitude-' if 'magnitude' in label else ''}{tree_label}"
            )
            result = timed([*exe, *map(str, cli), "-o", str(dest)], tree)
            result["digest"] = digest(dest)
            results[(label, tree_label)] = result
            print(
                f"{label} [{tree_label}]: {result['seconds']:.1f} s, "
                f"{result['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
        commands[label] = shlex.join(["weightops", *map(rel, cli), "-o", "OUT"])

    earlier = None
    names = [t for t, _ in trees]
    earlier_argv = []
    for path in args.earlier or ():
        earlier = json.loads(path.read_text())
        names = merge_earlier(earlier, results, commands, jobs, names)
        args.before = args.before or earlier["args"]["before"]
        earlier_argv.append(" ".join(earlier["args"]["argv"]))
    saved = {
        "args": {
            **vars(args),
            "earlier": [str(p) for p in args.earlier or ()],
            "earlier_argv": earlier_argv,
            "results": str(args.results),
            "argv": sys.argv[1:],
        },
        "params": params,
        "size_mb": size_mb,
        "fp32_mib": fp32_mib,
        "trees": names,
        "jobs": [label for label, _ in jobs],
        "forward": forward,
        "results": [[label, t, r] for (label, t), r in results.items()],
        "commands": commands,
    }
    args.results.write_text(json.dumps(saved, indent=1))
    if jobs:
        write_report(saved, tokens_per_pair(args.prompts))


def merge_earlier(
    earlier: dict, results: dict, commands: dict, jobs: list, names: list[str]
) -> list[str]:
    """Add the earlier run's measurements of runs not made now; the trees shown."""
    for label, t, r in earlier["results"]:
        if (label, t) not in results:
            results[(label, t)] = {**r, "earlier": True}
            commands.setdefault(label, earlier["commands"][label])
            if label not in [lab for lab, _ in jobs]:
                jobs.append((label, None))
    return [t for t in ("before", "after") if t in earlier["trees"] or t in names]


if __name__ == "__main__":
    main()
