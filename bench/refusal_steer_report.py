"""Markdown for bench/refusal_steer.py: the docs/steering.md section and the BENCHMARKS.md one."""

from __future__ import annotations

import statistics

from report import machine

BAR = 0.10  # ablation must leave at most this share of the baseline's refusals
SAMPLES = 3


def _kl_filter(r: dict) -> str:
    """Whether Arditi et al.'s KL filter would have left a direction that removes
    refusals (one that leaves at most half the shortlist's prompts refused)."""
    removing = [c for c in r["candidates"] if c.get("refused", 1.0) <= 0.5]
    cheapest = min((c["kl"] for c in removing), default=None)
    if cheapest is None or cheapest <= 0.1:
        return "the KL is reported here rather than used as a filter."
    return (
        "no direction of this model that removes refusals moves it that little (the "
        f"cheapest of those that leave at most half refused: {cheapest:.2f}), so the KL "
        "is reported instead."
    )


def _every(n: int) -> str:
    return {1: "every", 2: "every second", 3: "every third"}.get(n, f"every {n}th")


def _rate(m: dict) -> str:
    return f"{m['rate']:.0%} ({round(m['rate'] * m['n'])} of {m['n']})"


def _kl(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} (median {statistics.median(values):.3f}, max {max(values):.2f})"


def _table(r: dict) -> list[str]:
    base, hooks, baked = r["base"], r["ablate_hooks"], r["ablate_baked"]
    s = r["strength"]
    return [
        "| model | held-out harmful refused | held-out harmless refused | "
        "KL on held-out harmless, mean |",
        "|---|---|---|---|",
        f"| aligned model | {_rate(base['harmful'])} | {_rate(base['harmless'])} | — |",
        f"| direction ablated, hooks | **{_rate(hooks['harmful'])}** | "
        f"{_rate(hooks['harmless'])} | **{_kl(hooks['kl'])}** |",
        f"| direction ablated, baked (`steer ablate`) | **{_rate(baked['harmful'])}** | — | "
        f"{_kl(baked['kl'])} |",
        f"| direction added ×{s:g}, hooks | — | **{_rate(r['add_hooks']['harmless'])}** | — |",
        f"| direction added ×{s:g}, baked (`steer bake`) | — | "
        f"**{_rate(r['add_baked']['harmless'])}** | — |",
    ]


def _verdict(r: dict) -> str:
    before = r["base"]["harmful"]["rate"]
    lines = []
    for name, key in (("hooks", "ablate_hooks"), ("baked", "ablate_baked")):
        after = r[key]["harmful"]["rate"]
        share = after / before if before else float("nan")
        ok = "yes" if share <= BAR else "**no**"
        lines.append(f"{name} {share:.0%} of the baseline ({ok})")
    return (
        f"Bar: ablation leaves at most {BAR:.0%} of the baseline's refusals of held-out harmful "
        f"prompts: {'; '.join(lines)}."
    )


def _samples(r: dict, kind: str, before: str, after: str) -> list[str]:
    prompts = r["prompts"][kind]
    a, b = r[before][kind]["answers"], r[after][kind]["answers"]
    step = max(1, len(prompts) // SAMPLES)
    lines = []
    for i in range(0, step * SAMPLES, step):
        lines += [f"{prompts[i]}", f"    before: {a[i]!r}", f"    after:  {b[i]!r}"]
    return lines


def _candidates(r: dict) -> list[str]:
    """Layers as rows, post-instruction tokens as columns: refusal score / KL."""
    names = [repr(t).replace("|", "\\|") for t in r["post_tokens"]]
    n = len(names)
    cells = {(c["layer"], c["position"]): c for c in r["candidates"]}
    lines = [
        "| layer | " + " | ".join(f"{name} ({p - n})" for p, name in enumerate(names)) + " |",
        "|---|" + "---:|" * n,
    ]
    for layer in sorted({c["layer"] for c in r["candidates"]}):
        row = []
        for p in range(-n, 0):
            c = cells.get((layer, p))
            text = "" if c is None else f"{c['score']:+.2f} / {c['kl']:.2f}"
            if c is not None and "refused" in c:
                text += f" / {c['refused']:.0%}"
            picked = layer == r["layer"] and p == r["position"]
            row.append(f"**{text}**" if picked else text)
        lines.append(f"| {layer} | " + " | ".join(row) + " |")
    return lines


def render(r: dict) -> tuple[str, str]:
    """(docs/steering.md section body, BENCHMARKS.md section body) from the results."""
    rep, command, every = r["repeng"], r["command"], r["every"]
    layer, depth = r["layer"], r["depth"]
    layers = sorted({c["layer"] for c in r["candidates"]})
    position, n = r["position"], len(r["post_tokens"])
    token = repr(r["post_tokens"][position])
    setup = [
        f"- Command: `{command}` ({r['seconds'] / 60:.0f} minutes"
        + (
            "; the directions and the candidates' scores came from earlier runs with the "
            "same settings, which `--resume` reused)"
            if r.get("resumed")
            else f", of which {r['select_seconds'] / 60:.0f} to extract the directions and "
            "choose the layer and token)"
        ),
        f"- Machine: {machine()}; 1-minute load average {r['load'][0]:.1f} at start, "
        f"{r['load'][1]:.1f} at end",
        f"- Peer: {rep['version']}",
    ]
    measures = (
        f"Refusals: greedy answers of {r['new_tokens']} new tokens matched by weightops' refusal "
        f"phrases, on {_every(every)} held-out prompt. KL: KL(aligned ‖ steered) of the first "
        f"answer token's distribution, on {_every(r.get('kl_every', 1))} held-out harmless "
        f"prompt ({r['kl_n']})."
    )
    table = _table(r)
    cos = (
        f"Cosine to repeng's direction at layer {layer} (repeng's `pca_diff`, the same "
        f"{r['pairs']} chat-templated pairs, fp32): weightops' `pca_diff` "
        f"{rep['cos_pca_diff']:.6f}; weightops' `mean_diff` (the refusal direction) "
        f"{rep['cos_mean_diff']:.3f}; between weightops' two, {rep['cos_ours_mean_pca']:.3f}."
    )
    consistency = (
        "The baked checkpoints (fp32) agree with the hooks: the largest difference of a "
        f"first-token log-probability is {r['ablate_baked']['max_logprob_diff']:.1e} for "
        f"ablation and {r['add_baked']['max_logprob_diff']:.1e} for addition."
    )
    docs = [
        "The same experiment as Arditi et al. (*Refusal in Language Models Is Mediated by a "
        "Single Direction*, 2024), on the aligned model (SmolLM2-135M-Instruct fine-tuned to "
        "refuse, [aligned_model.md](aligned_model.md)), with weightops' commands:",
        "",
        "```",
        *[f"weightops {c}" for c in r["commands"]],
        "```",
        "",
        f"`pairs.jsonl` holds {r['pairs']} pairs: a harmful training instruction as "
        "`positive`, a harmless one as `negative` (bench/data/refusal/). `--chat-template` "
        "wraps each as a user turn; `mean_diff` is the difference of the two means of the "
        f"residual stream at one token, here `--position {position}`, the {token} of the "
        "assistant header that the template puts after the instruction.",
        "",
        "Which direction to remove is chosen as Arditi et al. choose it, over layers and "
        "the post-instruction tokens (the end of the user's turn and the assistant header, "
        f"{n} tokens), on {r['val']} harmful and {r['val']} harmless training prompts that "
        "the pairs do not use. The candidates are the mean differences at each of those "
        f"tokens, at layers {', '.join(map(str, layers))} ({_every(r['layer_step'])} layer "
        "from a quarter to 80 % of the depth), read in one pass over the pairs. Each is "
        "ablated in turn (hooks) and scored by the refusal score it leaves on the harmful "
        "prompts (the mean log-odds that the answer opens with a token that opens a "
        f"training refusal, {', '.join(repr(t) for t in r['refusal_tokens'])}; "
        f"{r['base_score']:+.2f} without ablation) and by the mean KL it causes in the "
        "harmless prompts' first-token distribution. The first-token score alone can "
        "mislead: a direction that lowers it may leave answers that refuse after another "
        'opening word ("Awful question, but I can\'t help with it"). So the '
        f"{r['shortlist']} lowest-scoring candidates are ablated again for greedy answers "
        f"of {r['new_tokens']} tokens to the harmful prompts, and the fewest refusals win, "
        "the KL breaking ties. Arditi et al. also drop directions whose ablation moves the "
        f"harmless distribution by a mean KL over 0.1; {_kl_filter(r)} The "
        f"winner: layer **{layer}**, token {token} (position {position}; norm of its "
        f"direction {r['norm']:.1f}; cosine {r['cos_api_cli']:.6f} to the one "
        "`steer train` extracted). Refusal score / KL of each candidate, and the share of "
        "greedy answers refused for the shortlist:",
        "",
        *_candidates(r),
        "",
        "Ablation projects the direction out of every write to the residual stream "
        "(embeddings, attention and MLP outputs, and the tied output head's input); addition "
        f"adds the direction (×{r['strength']:g}) to block {layer}'s output at every position. "
        "The prompts are the held-out splits, about topics no training prompt mentions. "
        + measures,
        "",
        *table,
        "",
        _verdict(r),
        "",
        consistency,
        "",
        cos,
        "",
        "Held-out harmful prompts, before and after ablation (hooks):",
        "",
        "```",
        *_samples(r, "harmful", "base", "ablate_hooks"),
        "```",
        "",
        "Held-out harmless prompts, before and after addition (hooks):",
        "",
        "```",
        *_samples(r, "harmless", "base", "add_hooks"),
        "```",
        "",
        *setup,
        "",
    ]
    bench = [
        "The refusal direction of the aligned model (Arditi et al. 2024): `mean_diff` of "
        f"{r['pairs']} (harmful, harmless) pairs at the post-instruction token and layer "
        f"whose ablation leaves the fewest greedy refusals of a shortlist by refusal score (token {token}, "
        f"position {position}, layer {layer} of {depth}); ablated and added by hooks and "
        "baked (fp32). " + measures,
        "",
        *setup,
        "",
        *table,
        "",
        _verdict(r),
        "",
        consistency,
        "",
        cos,
        "",
    ]
    return "\n".join(docs), "\n".join(bench)
