"""The tables of bench/bench_repair.py: the runs of one invocation (its results.json)
written into BENCHMARKS.md, `bench_repair` for prune and restore, or
`bench_repair_restore` for an invocation of restore alone (`--no-prune`)."""

from __future__ import annotations

import argparse
import shlex

from report import machine, write_section


def write_report(saved: dict, tokens: int) -> None:
    """The table of a run into its section; `tokens`: tokens per harmful pair."""
    args = argparse.Namespace(**saved["args"])
    results = {(label, t): r for label, t, r in saved["results"]}
    jobs = list(saved["jobs"])
    body = report(args, saved, saved["trees"], jobs, results, tokens)
    if saved["forward"] is None:
        write_section("bench_repair_restore", "Repair: restoration's peak memory on 150M", body)
    else:
        write_section("bench_repair", "Repair: Antidote pruning and restoration on 150M", body)
    print(body)


def report(
    args: argparse.Namespace,
    saved: dict,
    names: list[str],
    jobs: list[str],
    results: dict,
    tokens: int,
) -> str:
    forward, fp32_mib = saved["forward"], saved["fp32_mib"]
    cols = " | ".join(f"{t} wall (s) | {t} peak RSS (MiB)" for t in names)
    lines = [f"| run | {cols} | identical output |", "|---|" + "---|" * (2 * len(names)) + "---|"]
    if forward is not None:
        in_process = forward["stderr"].splitlines()[-1].split(": ", 1)[1]
        lines.append(
            f"| plain forward of the fine-tune, float32, logits ({in_process} of it in the "
            "forward calls) | "
            + " | ".join(
                f"{forward['seconds']:.1f} | {forward['peak_rss_mib']:.0f}"
                if t == "after"
                else "– | –"
                for t in names
            )
            + " | |"
        )

    def mark(label: str, t: str) -> str:
        return "†" if results[(label, t)].get("earlier") else ""

    for label in jobs:
        cells = " | ".join(
            f"{results[(label, t)]['seconds']:.1f}{mark(label, t)} | "
            f"{results[(label, t)]['peak_rss_mib']:.0f}{mark(label, t)}"
            for t in names
        )
        same = ""
        if "before" in names:
            equal = results[(label, "before")]["digest"] == results[(label, "after")]["digest"]
            same = "yes" if equal else "**no**"
        lines.append(f"| {label} | {cells} | {same} |")
    bars = ["| bar | before | after | limit |", "|---|---|---|---|"]
    if forward is not None:
        prune_label = jobs[0]
        bars.append(
            "| repair prune wall / plain forward wall | "
            + " | ".join(
                f"{results[(prune_label, t)]['seconds'] / forward['seconds']:.2f}×"
                f"{mark(prune_label, t)}"
                if t in names
                else "–"
                for t in ("before", "after")
            )
            + " | ≤ 1.5× |"
        )
    restore_label = next((lab for lab in jobs if lab.startswith("restore")), None)
    if restore_label:
        bars.append(
            f"| repair restore peak RSS / fp32 model size ({fp32_mib:.0f} MiB) | "
            + " | ".join(
                f"{results[(restore_label, t)]['peak_rss_mib'] / fp32_mib:.2f}×"
                f"{mark(restore_label, t)}"
                if t in names
                else "–"
                for t in ("before", "after")
            )
            + " | ≤ 2× |"
        )
    cmd = "python " + shlex.join(["bench/bench_repair.py", *args.argv])
    before = (
        f" `before` is weightops at {args.before} (unpacked into bench/.work/repair-before), "
        '`after` this tree; "identical output" compares every tensor of the two outputs '
        "bit for bit."
        if args.before
        else ""
    )
    earlier = (
        " Cells marked † come from other invocations on the same machine the same day: "
        + "; ".join(f"`python bench/bench_repair.py {a}`" for a in args.earlier_argv)
        + "."
        if getattr(args, "earlier_argv", None)
        else ""
    )
    what = "`weightops repair`" if forward is not None else "`weightops repair restore` alone"
    text = (
        f"{what} on bench/.work/family-16L (random-weight Llama, 16 layers, hidden "
        f"768, {saved['params'] / 1e6:.0f}M parameters, {saved['size_mb']:.0f} MB of bf16, "
        f"{fp32_mib:.0f} MiB in float32): `ft_a` as the fine-tune, `base` as the aligned "
        f"model, both given the character tokenizer of weightops.demo. {args.prompts} "
        f"synthetic harmful prompt/response pairs (about {tokens} tokens each), batch 8, "
        "computed in float32 on CPU"
        + (f"; restore with {args.task_prompts} task examples" if restore_label else "")
        + ". Each run is its own process (model loading and writing included), one "
        "compute thread, wall time and peak RSS from `/usr/bin/time -f %M`; a Python "
        "process with torch and transformers loaded holds about 240 MiB before any model."
        + before
        + earlier
        + (f" {args.note}" if getattr(args, "note", "") else "")
        + (
            " The plain forward pass is the fine-tune loaded in float32 and run over the "
            "same pairs, batched as prune batches them, logits included: the bar for prune."
            if forward is not None
            else ""
        )
        + " The machine is shared with other jobs, so wall times vary between runs; the "
        "runs here are one after the other in one invocation."
    )
    return (
        text
        + f"\n\n- Command: `{cmd}`\n- Machine: {machine()}\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(bars)
        + "\n\nCommands (OUT: the output folder):\n\n"
        + "\n".join(f"- {label}: `{c}`" for label, c in saved["commands"].items())
        + "\n\n"
    )
