"""Benchmark `weightops merge` against mergekit on a synthetic Llama family.

For each merge method one recipe (mergekit YAML) is written and given to both
tools. Each tool runs as a child process so its wall time and peak RSS can be
measured in isolation; the outputs are then compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_family import FINE_TUNES, make_family
from peers import WORK, ensure_mergekit, mergekit_version
from report import BENCHMARKS_MD, REPO, machine, write_section

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
# Methods with random masks: the two tools draw different masks, so their outputs are
# compared in distribution (share of entries changed, mean size of the change).
RANDOM = ("dare_ties",)
DEFAULT_CHANGED = 0.3
# bf16 has an 8-bit significand: a correct fp32 merge rounded to bf16 differs from
# another by about one ulp, so anything beyond this is a real disagreement.
REL_FRO_BAR = 2.0**-8
MAX_ABS_BAR = 2.0**-6


@dataclass
class Run:
    seconds: float
    peak_mib: float


@dataclass
class Parity:
    worst_rel_fro: float
    worst_rel_fro_tensor: str
    worst_max_abs: float
    worst_max_abs_tensor: str
    only_weightops: list[str]
    only_mergekit: list[str]
    dtype_mismatches: list[str]
    n_compared: int
    tie_order: str = ""  # for TIES outside the bar: what an independent reference says
    random: str = ""  # for random methods: the comparison in distribution

    @property
    def within_bar(self) -> bool:
        return (
            self.worst_rel_fro <= REL_FRO_BAR
            and self.worst_max_abs <= MAX_ABS_BAR
            and not self.only_weightops
            and not self.only_mergekit
        )


def variant(changed: float) -> str:
    """Suffix for files of a family whose fine-tunes change another share of entries."""
    return "" if changed == DEFAULT_CHANGED else f"-c{round(changed * 100)}"


def ensure_family(n_layers: int, changed: float = 0.3) -> dict[str, Path]:
    root = WORK / f"family-{n_layers}L{variant(changed)}"
    names = ("base", *FINE_TUNES)
    if all((root / n / "model.safetensors.index.json").exists() for n in names):
        return {n: root / n for n in names}
    print(f"building {n_layers}-layer family in {root}", flush=True)
    return make_family(root, n_layers=n_layers, changed=changed)


def recipe(method: str, family: dict[str, Path]) -> dict:
    fts = [str(family[n]) for n in FINE_TUNES]
    common = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16"}
    if method == "linear":
        models = [
            {"model": m, "parameters": {"weight": w}}
            for m, w in zip(fts, (0.5, 0.3, 0.2), strict=True)
        ]
        return {**common, "models": models}
    if method == "task_arithmetic":
        models = [{"model": m, "parameters": {"weight": 0.5}} for m in fts]
        return {**common, "base_model": str(family["base"]), "models": models}
    if method in ("ties", "dare_ties"):
        models = [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in fts]
        return {
            **common,
            "base_model": str(family["base"]),
            "models": models,
            "parameters": {"normalize": True},
        }
    raise ValueError(f"no recipe for method {method!r}")


def write_recipe(method: str, family: dict[str, Path], n_layers: int, suffix: str = "") -> Path:
    path = WORK / "recipes" / f"{method}-{n_layers}L{suffix}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe(method, family), sort_keys=False))
    return path


def weightops_cmd(recipe_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "weightops", "merge", str(recipe_path), "-o", str(out), "--force"]


def mergekit_cmd(exe: Path, recipe_path: Path, out: Path) -> list[str]:
    return [str(exe), str(recipe_path), str(out)]


def measure(cmd: list[str], out: Path, log: Path) -> Run:
    """Run cmd to completion; wall time and its peak RSS as reported by GNU time."""
    # Neither tool should be able to reuse or trip over a previous result.
    shutil.rmtree(out, ignore_errors=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log.with_suffix(".rss")
    # Not wait4 on our own child: Python spawns it with vfork, and Linux carries the
    # parent's RSS high-water mark across exec, so this process's size (it holds
    # whole outputs while comparing) would leak into the child's ru_maxrss. GNU time
    # is a small fresh parent, so the %M it reports is the tool's own peak.
    timed = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *cmd]
    with log.open("w") as fh:
        start = time.perf_counter()
        proc = subprocess.run(timed, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}; log {log}:\n{tail}")
    peak_kib = int(rss_file.read_text().split()[-1])
    run = Run(seconds, peak_kib / 1024)
    # Per-run lines expose outliers that the median and max hide.
    print(f"  {log.stem}: {run.seconds:.2f} s, {run.peak_mib:.0f} MiB", flush=True)
    return run


def load_tensor_index(out: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            index.update(dict.fromkeys(f.keys(), shard))
    return index


def read(shard: Path, name: str) -> torch.Tensor:
    with safe_open(shard, framework="pt") as f:
        return f.get_tensor(name)


def compare(out_w: Path, out_m: Path) -> Parity:
    """Worst per-tensor disagreement, with the mergekit output as reference."""
    idx_w, idx_m = load_tensor_index(out_w), load_tensor_index(out_m)
    common = sorted(idx_w.keys() & idx_m.keys())
    parity = Parity(
        0.0,
        "",
        0.0,
        "",
        only_weightops=sorted(idx_w.keys() - idx_m.keys()),
        only_mergekit=sorted(idx_m.keys() - idx_w.keys()),
        dtype_mismatches=[],
        n_compared=len(common),
    )
    for name in common:
        w, m = read(idx_w[name], name), read(idx_m[name], name)
        if w.dtype != m.dtype:
            parity.dtype_mismatches.append(f"{name}: {w.dtype} vs {m.dtype}")
        w, m = w.double(), m.double()
        if w.shape != m.shape:
            parity.worst_rel_fro, parity.worst_rel_fro_tensor = float("inf"), name
            continue
        diff = w - m
        rel_fro = (diff.norm() / m.norm().clamp_min(1e-30)).item()
        max_abs = (diff.abs().max() / m.abs().max().clamp_min(1e-30)).item()
        if rel_fro > parity.worst_rel_fro:
            parity.worst_rel_fro, parity.worst_rel_fro_tensor = rel_fro, name
        if max_abs > parity.worst_max_abs:
            parity.worst_max_abs, parity.worst_max_abs_tensor = max_abs, name
    return parity


def random_stats(out: Path, base: Path) -> tuple[float, float]:
    """(share of entries that differ from the base, mean |out − base| over those)."""
    idx_o, idx_b = load_tensor_index(out), load_tensor_index(base)
    changed = total = 0
    l1 = 0.0
    for name, shard in idx_o.items():
        if name not in idx_b:
            continue
        x = read(shard, name)
        d = x.double() - read(idx_b[name], name).to(x.dtype).double()
        changed += int(torch.count_nonzero(d))
        total += d.numel()
        l1 += d.abs().sum().item()
    return changed / max(total, 1), l1 / max(changed, 1)


def random_parity(out_w: Path, out_m: Path, base: Path) -> Parity:
    """The same tensor names, and the changes to the base alike in distribution."""
    idx_w, idx_m = load_tensor_index(out_w), load_tensor_index(out_m)
    (kw, lw), (km, lm) = random_stats(out_w, base), random_stats(out_m, base)
    return Parity(
        0.0,
        "",
        0.0,
        "",
        only_weightops=sorted(idx_w.keys() - idx_m.keys()),
        only_mergekit=sorted(idx_m.keys() - idx_w.keys()),
        dtype_mismatches=[],
        n_compared=len(idx_w.keys() & idx_m.keys()),
        random=(
            f"random masks (each tool draws its own), compared in distribution: share of "
            f"entries changed from the base {kw:.3f} (weightops) vs {km:.3f} (mergekit), "
            f"mean |change| ratio {lw / lm:.3f}"
        ),
    )


def ties_reference(family: dict[str, Path], name: str, stable: bool) -> torch.Tensor:
    """The bench recipe's TIES (weight 1, density 0.5, normalize) for one tensor, written
    out plainly; `stable` picks how entries tied at the trim threshold are ordered."""
    idx = {n: load_tensor_index(family[n]) for n in ("base", *FINE_TUNES)}
    base = read(idx["base"][name], name).float()
    deltas = []
    for ft in FINE_TUNES:
        d = (read(idx[ft][name], name).float() - base).reshape(-1)
        keep = torch.argsort(d.abs(), descending=True, stable=stable)[
            : max(1, int(0.5 * d.numel()))
        ]
        mask = torch.zeros_like(d)
        mask[keep] = 1
        deltas.append(d * mask)
    stacked = torch.stack(deltas)
    agree = stacked.sign() == torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    count = agree.sum(0).float()
    merged = (stacked * agree).sum(0) / torch.where(count == 0, 1.0, count)
    return (base.reshape(-1) + merged).reshape(base.shape).to(torch.bfloat16)


def tie_order_note(family: dict[str, Path], out_w: Path, out_m: Path, name: str) -> str:
    """Does each tool equal the plain formula under its own tie order?"""
    w = read(load_tensor_index(out_w)[name], name)
    m = read(load_tensor_index(out_m)[name], name)
    stable, unstable = ties_reference(family, name, True), ties_reference(family, name, False)
    scale = m.float().abs().max()

    def gap(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{((a.float() - b.float()).abs().max() / scale).item():.1e}"

    return (
        f"on `{name}`, a plain re-derivation of TIES with a stable sort (ties at the trim "
        f"threshold kept in index order) differs from weightops by {gap(w, stable)} and "
        f"with torch's default unstable argsort from mergekit by {gap(m, unstable)} "
        f"(max abs / max|m|): each tool computes the same formula, and they part only in "
        f"which entries tied at the threshold survive the trim"
    )


def fmt_ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def render(
    command: str,
    n_layers: int,
    repeats: int,
    rows: dict[str, tuple[Run, Run | None, Parity | None]],
    flatness: tuple[Run, Run] | None,
    peer: str | None,
    load: tuple[float, float],
    changed: float,
) -> str:
    lines = [
        f"Synthetic Llama family, {n_layers} layers (~150M parameters at 16), bf16, two shards per model; "
        f"each fine-tune changes {changed:.0%} of the base's entries (small noise) plus 0.1% large ones; "
        f"recipes compute in float32 and write bfloat16. Median wall time and max peak RSS over "
        f"{repeats} alternating runs per tool.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        f"- Peer: {peer or 'not run (--skip-peer)'}",
        # Other work on the machine inflates both tools' times unevenly; say so.
        f"- 1-minute load average: {load[0]:.1f} at start, {load[1]:.1f} at end",
        "",
        "| method | weightops s | mergekit s | time ratio (w/m) | weightops peak MiB | "
        "mergekit peak MiB | RSS ratio | max rel Frobenius | within bf16 bar |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for method, (w, m, parity) in rows.items():
        m_s = f"{m.seconds:.2f}" if m else "n/a"
        m_rss = f"{m.peak_mib:.0f}" if m else "n/a"
        rel = f"{parity.worst_rel_fro:.2e}" if parity else "n/a"
        ok = ("yes" if parity.within_bar else "**no**") if parity else "n/a"
        if parity and parity.random:
            rel, ok = "random", "n/a"
        lines.append(
            f"| {method} | {w.seconds:.2f} | {m_s} | {fmt_ratio(w.seconds, m and m.seconds)} | "
            f"{w.peak_mib:.0f} | {m_rss} | {fmt_ratio(w.peak_mib, m and m.peak_mib)} | {rel} | {ok} |"
        )
        if parity and parity.random:
            notes.append(
                f"- {method}: {parity.random}; only in weightops: "
                f"{parity.only_weightops or 'none'}; only in mergekit: "
                f"{parity.only_mergekit or 'none'}"
            )
        elif parity and parity.worst_rel_fro == parity.worst_max_abs == 0:
            notes.append(
                f"- {method}: all {parity.n_compared} common tensors bit-identical; "
                f"only in weightops: {parity.only_weightops or 'none'}; "
                f"only in mergekit: {parity.only_mergekit or 'none'}; "
                f"dtype mismatches: {parity.dtype_mismatches or 'none'}"
            )
        elif parity:
            notes.append(
                f"- {method}: worst rel Frobenius {parity.worst_rel_fro:.2e} "
                f"(`{parity.worst_rel_fro_tensor}`), worst max-abs/max|m| {parity.worst_max_abs:.2e} "
                f"(`{parity.worst_max_abs_tensor}`); only in weightops: {parity.only_weightops or 'none'}; "
                f"only in mergekit: {parity.only_mergekit or 'none'}; "
                f"dtype mismatches: {parity.dtype_mismatches or 'none'}"
                + (f"; {parity.tie_order}" if parity.tie_order else "")
            )
    lines += [
        "",
        "Bar: rel Frobenius <= 2^-8 and max abs diff <= 2^-6 * max|m| for every tensor "
        "(m = mergekit output), and the same tensor names in both outputs.",
        "",
        *notes,
    ]
    if flatness:
        small, large = flatness
        lines += [
            "",
            "Peak RSS of `weightops merge` (linear) versus model depth:",
            "",
            f"- 8 layers: {small.peak_mib:.0f} MiB",
            f"- {n_layers} layers: {large.peak_mib:.0f} MiB",
            f"- ratio {n_layers}L/8L: {large.peak_mib / small.peak_mib:.2f}",
        ]
    return "\n".join(lines) + "\n"


def bench_method(
    method: str,
    family: dict[str, Path],
    n_layers: int,
    repeats: int,
    mergekit: Path | None,
    suffix: str = "",
) -> tuple[Run, Run | None, Parity | None]:
    recipe_path = write_recipe(method, family, n_layers, suffix)
    out_w, out_m = WORK / "out" / f"{method}-weightops", WORK / "out" / f"{method}-mergekit"
    logs = WORK / "logs"
    w_runs: list[Run] = []
    m_runs: list[Run] = []
    for rep in range(repeats):
        # Alternate which tool goes first so page-cache warmth favours neither.
        order = ["w", "m"] if rep % 2 == 0 else ["m", "w"]
        for tool in order:
            if tool == "w":
                w_runs.append(
                    measure(
                        weightops_cmd(recipe_path, out_w),
                        out_w,
                        logs / f"{method}-weightops-{rep}.log",
                    )
                )
            elif mergekit:
                m_runs.append(
                    measure(
                        mergekit_cmd(mergekit, recipe_path, out_m),
                        out_m,
                        logs / f"{method}-mergekit-{rep}.log",
                    )
                )
    w = summarize(w_runs)
    m = summarize(m_runs) if m_runs else None
    parity = None
    if mergekit:
        random = method in RANDOM
        parity = random_parity(out_w, out_m, family["base"]) if random else compare(out_w, out_m)
    if parity and method == "ties" and not parity.within_bar:
        parity.tie_order = tie_order_note(family, out_w, out_m, parity.worst_max_abs_tensor)
    return w, m, parity


def summarize(runs: list[Run]) -> Run:
    return Run(statistics.median(r.seconds for r in runs), max(r.peak_mib for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of " + ",".join(METHODS),
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--skip-peer", action="store_true", help="run weightops only")
    parser.add_argument(
        "--changed",
        type=float,
        default=DEFAULT_CHANGED,
        help="share of entries each fine-tune changes (its own section in the report)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help=f"do not update {BENCHMARKS_MD.name}"
    )
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods: {sorted(unknown)}")

    load_start = os.getloadavg()[0]
    suffix = variant(args.changed)
    family = ensure_family(args.layers, args.changed)
    mergekit = None if args.skip_peer else ensure_mergekit()
    peer = None if args.skip_peer else mergekit_version()

    rows = {}
    for method in methods:
        print(f"{method}: {args.repeats} runs per tool", flush=True)
        rows[method] = bench_method(method, family, args.layers, args.repeats, mergekit, suffix)

    flatness = None
    if args.layers != 8 and not suffix:
        # Streaming should keep peak RSS roughly independent of depth.
        small_family = ensure_family(8)
        small_recipe = write_recipe("linear", small_family, 8)
        out = WORK / "out" / "linear-8L-weightops"
        small = measure(
            weightops_cmd(small_recipe, out), out, WORK / "logs" / "linear-8L-weightops.log"
        )
        if "linear" in rows:
            large = rows["linear"][0]
        else:
            big_recipe = write_recipe("linear", family, args.layers)
            out = WORK / "out" / "linear-weightops"
            large = measure(
                weightops_cmd(big_recipe, out), out, WORK / "logs" / "linear-weightops.log"
            )
        flatness = (small, large)

    command = shlex.join(["python", "bench/bench_merge.py", *sys.argv[1:]])
    load = (load_start, os.getloadavg()[0])
    body = render(command, args.layers, args.repeats, rows, flatness, peer, load, args.changed)
    print(body)
    if not args.no_write:
        write_section(
            f"bench_merge{suffix}",
            "Merge: weightops vs mergekit"
            + (f" ({args.changed:.0%} of entries changed per fine-tune)" if suffix else ""),
            body,
        )
        print(f"updated {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
