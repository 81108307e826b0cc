"""The long fuzz campaign: corrupted safetensors files, JSON side files, recipes and
JSONL data thrown at weightops' readers, with the `safetensors` library as the judge
of what a valid file is.

Every case is one of: refused with a weightops error (fine), accepted (fine, if the
library accepts it too and the bytes read are the library's), a crash (any other
exception: a traceback for the user), a hang (over --case-timeout seconds), accepted
although the library refuses it, or read with bytes that differ from the library's.
The bulk runs in-process; a sample goes through the real CLI in subprocesses
(`inspect`, `merge`, `validate`, `merge --dry-run`, `steer train`-style readers) to
catch what only the command line does (exit codes, tracebacks, leftovers).

    PYTHONPATH=. python bench/fuzz.py --cases 2000 --cli 60 --seed 0

prints the counts per campaign and outcome (docs/reliability.md records a run).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutate import (
    BASE_JSONL,
    JSONL_SNIPPETS,
    RECIPE_SNIPPETS,
    base_recipes,
    mutate_json,
    mutate_safetensors,
    mutate_text,
)

from weightops.errors import WeightopsError


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang


@contextlib.contextmanager
def time_limit(seconds: float):
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def judge(fn: Callable[[], object], seconds: float) -> tuple[str, object]:
    """('ok', result) | ('refused', message) | ('crash', repr) | ('hang', None)."""
    try:
        with time_limit(seconds):
            return "ok", fn()
    except WeightopsError as e:
        return "refused", str(e)
    except Hang:
        return "hang", None
    except Exception as e:
        return "crash", f"{type(e).__name__}: {e}"[:300]


# ------------------------------------------------------------------ safetensors


def seed_files(folder: Path) -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    sets = [
        {"a": torch.randn(3, 4, generator=g), "b": torch.arange(5, dtype=torch.int64)},
        {"w": torch.randn(2, 2, generator=g).to(torch.bfloat16), "z": torch.zeros(0, 3)},
        {"x": torch.randn(7, generator=g).half(), "m": torch.tensor([True, False])},
        {f"layer.{i}.w": torch.randn(4, 4, generator=g) for i in range(6)},
    ]
    blobs = []
    for i, tensors in enumerate(sets):
        path = folder / f"seed{i}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt", "n": str(i)})
        blobs.append(path.read_bytes())
    return blobs


def library_read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def our_read(path: Path) -> dict[str, torch.Tensor]:
    from weightops.io.safetensors_file import FileReader, read_header

    infos, _ = read_header(path)
    with FileReader() as reader:
        return {name: reader.read(info) for name, info in infos.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.numel() and not torch.equal(
            x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
        ):
            return False
    return True


def safetensors_case(path: Path, timeout: float) -> tuple[str, str]:
    verdict, ours = judge(lambda: our_read(path), timeout)
    try:
        theirs: dict | None = library_read(path)
    except Exception:
        theirs = None
    if verdict in ("crash", "hang"):
        return verdict, str(ours)
    if verdict == "ok":
        if theirs is None:
            return "accepted_library_refuses", ""
        return ("ok_same_bytes", "") if _same(ours, theirs) else ("wrong_bytes", "")
    if theirs is not None:
        why = re.sub(r"'[^']*'|\d+", "…", str(ours).split(": ", 1)[-1])
        return "refused_library_accepts", why.split(" (")[0][:80]
    return "refused_both", ""


# --------------------------------------------------------------- other inputs


def checkpoint_case(folder: Path, timeout: float) -> tuple[str, str]:
    from weightops.cli.inspect import describe_checkpoint
    from weightops.io.sidefiles import TOKENIZER_FILES, read_side_file

    def run() -> None:
        describe_checkpoint(folder)
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            read_side_file(folder, name)

    verdict, detail = judge(run, timeout)
    return verdict, str(detail) if verdict != "ok" else ""


def recipe_case(path: Path, out: Path, timeout: float) -> tuple[str, str]:
    from weightops.engine.plan import build_plan
    from weightops.engine.run import RunOptions, execute
    from weightops.recipe import load_recipe

    verdict, plan = judge(lambda: build_plan(load_recipe(path), path.parent), timeout)
    if verdict != "ok":
        return verdict, str(plan) if verdict != "refused" else ""
    options = RunOptions(device="cpu", force=True, progress=False)
    merged, detail = judge(lambda: execute(plan, out, options), timeout * 4)
    shutil.rmtree(out, ignore_errors=True)
    if merged == "refused":
        return "validated_merge_refuses", str(detail)[:200]
    return ("validated_merged" if merged == "ok" else merged), str(detail) if merged != "ok" else ""


def jsonl_case(path: Path, timeout: float) -> tuple[str, str]:
    from weightops.cli.steer import read_pairs
    from weightops.quant.calibrate import read_texts
    from weightops.repair.data import load_examples

    outcomes = [
        judge(lambda f=f: f(path), timeout) for f in (read_pairs, load_examples, read_texts)
    ]
    for verdict, detail in outcomes:
        if verdict in ("crash", "hang"):
            return verdict, str(detail)
    accepted = sum(verdict == "ok" for verdict, _ in outcomes)
    return f"accepted by {accepted} of 3 readers, refused by the rest", ""


# ------------------------------------------------------------------------ CLI


def cli(args: list[str], timeout: float) -> tuple[str, str]:
    """Run the real command line; 'ok' or 'refused' (exit 0/1, no traceback) or a fault."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "weightops", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            errors="replace",
        )
    except subprocess.TimeoutExpired:
        return "hang", " ".join(args)[:200]
    if "Traceback" in proc.stderr or proc.returncode not in (0, 1):
        return "crash", f"exit {proc.returncode}: {proc.stderr[-300:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == 1 and not (lines and lines[0].startswith("error: ")):
        return "crash", f"exit 1 without an error line: {proc.stderr[-300:]}"
    return ("ok" if proc.returncode == 0 else "refused"), ""


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.glob(f".{out.name}.weightops-*")]


# ----------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", type=int, default=2000, help="in-process cases per campaign")
    ap.add_argument("--cli", type=int, default=40, help="cases per campaign run through the CLI")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case-timeout", type=float, default=10.0)
    ap.add_argument("--cli-timeout", type=float, default=120.0)
    args = ap.parse_args()

    from weightops.demo import fine_tune, tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="weightops-fuzz-"))
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    examples: dict[tuple[str, str], str] = {}
    faults = {
        "crash",
        "hang",
        "accepted_library_refuses",
        "wrong_bytes",
        "validated_merge_refuses",
        "leftovers",
    }

    def note(campaign: str, outcome: str, detail: str, case: str) -> None:
        counts[campaign][outcome] += 1
        if outcome in faults and (campaign, outcome) not in examples:
            examples[(campaign, outcome)] = f"{case}: {detail}"
        if outcome == "refused_library_accepts":
            counts[campaign + " (stricter: why)"][detail] += 1

    started = time.perf_counter()
    try:
        fam = tmp / "fam"
        base = tiny_model(fam / "base", "llama", seed=0, shard_size="60KB")
        fine_tune(base, fam / "ft_a", seed=1, shard_size="60KB")
        fine_tune(base, fam / "ft_b", seed=2, shard_size="60KB")
        single = tiny_model(tmp / "single", "llama", seed=0)
        seeds = seed_files(tmp) + [p.read_bytes() for p in sorted(single.glob("*.safetensors"))]
        rng = random.Random(args.seed)
        cases = tmp / "cases"
        cases.mkdir()

        # 1. safetensors files, in process, against the library.
        for i in range(args.cases):
            kind, blob = mutate_safetensors(rng.choice(seeds), rng)
            path = cases / f"st{i}.safetensors"
            path.write_bytes(blob)
            outcome, detail = safetensors_case(path, args.case_timeout)
            note("safetensors", outcome, detail, f"#{i} {kind}")
            path.unlink()

        # 2. the same through the CLI: a one-file model whose shard is the mutant.
        for i in range(args.cli):
            kind, blob = mutate_safetensors(rng.choice(seeds[-1:]), rng)
            model = cases / f"m{i}"
            shutil.copytree(single, model)
            (model / "model.safetensors").write_bytes(blob)
            outcome, detail = cli(["inspect", str(model)], args.cli_timeout)
            note("safetensors via `inspect`", outcome, detail, f"#{i} {kind}")
            recipe = cases / f"m{i}.yaml"
            recipe.write_text(
                f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1}}\n"
                f"  - model: {single}\n    parameters: {{weight: 1}}\n"
            )
            out = cases / f"out{i}"
            outcome, detail = cli(
                ["merge", str(recipe), "-o", str(out), "--device", "cpu"], args.cli_timeout
            )
            if leftovers(out):
                outcome, detail = "leftovers", ", ".join(leftovers(out))
            note("safetensors via `merge`", outcome, detail, f"#{i} {kind}")
            shutil.rmtree(model)
            shutil.rmtree(out, ignore_errors=True)

        # 3. config.json, the index and tokenizer side files.
        json_names = [
            "config.json",
            "model.safetensors.index.json",
            "tokenizer_config.json",
            "generation_config.json",
        ]
        work = cases / "ckpt"
        for i in range(args.cases // 4):
            shutil.copytree(fam / "base", work)
            name = rng.choice(json_names)
            kind, blob = mutate_json((work / name).read_bytes(), rng)
            (work / name).write_bytes(blob)
            outcome, detail = checkpoint_case(work, args.case_timeout)
            note("config, index, side files", outcome, detail, f"#{i} {name} {kind}")
            shutil.rmtree(work)

        # 4. recipes: validate's verdict, then a real merge of every recipe it accepts.
        recipes = base_recipes(fam)
        for i in range(args.cases // 4):
            kind, text = mutate_text(rng.choice(recipes), rng, RECIPE_SNIPPETS)
            path = cases / f"r{i}.yaml"
            path.write_bytes(text)
            outcome, detail = recipe_case(path, cases / f"rout{i}", args.case_timeout)
            note("recipes", outcome, detail, f"#{i} {kind}")
            if i < args.cli:
                for cmd in (
                    ["validate", str(path)],
                    ["merge", str(path), "-o", str(cases / "ro"), "--dry-run"],
                ):
                    outcome, detail = cli(cmd, args.cli_timeout)
                    note(
                        f"recipes via `{cmd[0]}{' --dry-run' if len(cmd) > 2 else ''}`",
                        outcome,
                        detail,
                        f"#{i} {kind}",
                    )
            path.unlink()

        # 5. JSONL data: steering pairs, repair examples, calibration texts.
        for i in range(args.cases // 4):
            kind, text = mutate_text(rng.choice(BASE_JSONL), rng, JSONL_SNIPPETS)
            path = cases / f"d{i}.jsonl"
            path.write_bytes(text)
            outcome, detail = jsonl_case(path, args.case_timeout)
            note("JSONL", outcome, detail, f"#{i} {kind}")
            path.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"# fuzz run: seed {args.seed}, {args.cases} cases, {args.cli} CLI cases, "
        f"{time.perf_counter() - started:.0f} s"
    )
    for campaign, counter in counts.items():
        total = sum(counter.values())
        print(f"\n{campaign} ({total})")
        for outcome, n in counter.most_common():
            print(f"  {n:6d}  {outcome}")
    bad = {k: v for k, v in examples.items()}
    print("\nfaults:", "none" if not bad else "")
    for (campaign, outcome), example in bad.items():
        print(f"  {campaign} / {outcome}: {example}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
