"""Run mergekit's own recipes with mergekit and with weightops, side by side.

The corpus is tests/mergekit_configs/ (every recipe of mergekit's examples/ and every
merge configuration its test suite builds), on the tiny models of
tests/mergekit_corpus.py. mergekit runs in its own virtualenv (bench/.work/), all
recipes in one process; weightops runs in this one, once in its default numerics
(fp32 compute) and once with `--numerics mergekit`. The outputs are compared tensor by
tensor, and config.json and the tokenizer (vocabulary, added tokens, and the chat
template by what it renders); the table goes to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mergekit_corpus import (
    EXPECT_ERROR,
    MERGEKIT_COMMIT,
    build_family,
    config_names,
    render,
    run_recipe,
)
from peers import WORK, ensure_mergekit, mergekit_version
from report import machine, write_section

MERGEKIT_VERSION = "0.1.4"
VENV = WORK / f"venv-mergekit-{MERGEKIT_VERSION}"
OUT = WORK / "mergekit-parity"
# Methods whose masks are random: the two tools draw them differently, so their
# outputs are compared by statistics, not entry by entry.
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
# Written by each tool's own version of transformers, so never the same.
CONFIG_NOISE = {"transformers_version"}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of `t`'s dtype at each |value| (fp64), the smallest normal's below."""
    info = torch.finfo(t.dtype)
    mag = t.double().abs().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def ulp_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x − y| in ulps of the dtype at the larger of |x|, |y| (same dtype)."""
    wider = torch.where(x.double().abs() >= y.double().abs(), x, y)
    return float(((x.double() - y.double()).abs() / _ulp(wider)).max())


def compare_tensors(a: Path, b: Path) -> dict[str, object]:
    """Max abs and ulp differences of b against a over their common tensors; None
    where they do not have the same tensors and dtypes."""
    ta, tb = _tensors(a), _tensors(b)
    if set(ta) != set(tb):
        only = sorted(set(ta) ^ set(tb))
        return {"same_names": False, "why": f"tensors in one output only: {only[:3]}"}
    max_abs, max_ulp, identical = 0.0, 0.0, True
    for name, x in ta.items():
        y = tb[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            return {"same_names": False, "why": f"{name}: {x.dtype} vs {y.dtype}"}
        if x.is_floating_point():
            identical &= bool(torch.equal(x.view(torch.uint8), y.view(torch.uint8)))
            max_abs = max(max_abs, (x.double() - y.double()).abs().max().item())
            max_ulp = max(max_ulp, ulp_distance(x, y))
        else:
            identical &= bool(torch.equal(x, y))
    return {"same_names": True, "identical": identical, "max_abs": max_abs, "max_ulp": max_ulp}


def random_stats(out: Path, base: Path) -> tuple[float, float]:
    """(share of entries that differ from the base, mean |out − base| over those)."""
    o, b = _tensors(out), _tensors(base)
    changed = total = 0
    l1 = 0.0
    for name, x in o.items():
        if name not in b or not x.is_floating_point() or b[name].shape != x.shape:
            continue
        d = x.double() - b[name].to(x.dtype).double()
        changed += int(torch.count_nonzero(d))
        total += d.numel()
        l1 += d.abs().sum().item()
    return changed / max(total, 1), l1 / max(changed, 1)


def _config(folder: Path) -> dict:
    data = json.loads((folder / "config.json").read_text())
    return {k: v for k, v in data.items() if k not in CONFIG_NOISE}


def _tokenizer(folder: Path) -> tuple | None:
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    tok = json.loads(path.read_text())
    added = sorted((t["id"], t["content"]) for t in tok.get("added_tokens", []))
    template = None
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").exists():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    return tok["model"].get("vocab"), added, _rendered(template)


def _empty_tokenizer(folder: Path) -> bool:
    found = _tokenizer(folder)
    return found is not None and not found[0] and not found[1]


def _rendered(template: str | None) -> str | None:
    """A chat template by what it produces: a short conversation rendered as
    transformers renders templates (two tools may write the same format differently)."""
    if template is None:
        return None
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    return "\n".join(
        env.from_string(template).render(
            messages=chat, add_generation_prompt=g, bos_token="<s>", eos_token="</s>"
        )
        for g in (False, True)
    )


def side_files(a: Path, b: Path) -> str:
    ca, cb = _config(a), _config(b)
    diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    config = "same" if not diff else "differs: " + ", ".join(diff)
    tok = "same" if _tokenizer(a) == _tokenizer(b) else "differs"
    return f"config {config}; tokenizer {tok}"


def run_mergekit(names: list[str], recipes: Path, outs: Path) -> dict[str, dict]:
    python = VENV / "bin" / "python"
    jobs = [[str(recipes / f"{_folder(n)}.yaml"), str(outs / _folder(n))] for n in names]
    (OUT / "jobs.json").write_text(json.dumps(jobs))
    driver = Path(__file__).resolve().parent / "mergekit_run_all.py"
    subprocess.run(
        [str(python), str(driver), str(OUT / "jobs.json"), str(OUT / "mergekit-results.json")],
        check=True,
    )
    results = json.loads((OUT / "mergekit-results.json").read_text())
    return {n: results[str(recipes / f"{_folder(n)}.yaml")] for n in names}


def run_ours(names: list[str], texts: dict[str, str], outs: Path, numerics: str) -> dict:
    results = {}
    for n in names:
        try:
            run_recipe(texts[n], n, outs / _folder(n), numerics=numerics)
            results[n] = {"ok": True, "error": ""}
        except Exception as e:  # every failure is a result to report
            msg = " ".join(str(e).split())
            results[n] = {"ok": False, "error": f"{type(e).__name__}: {msg}"[:300]}
    return results


def _short(error: str) -> str:
    """An error for a table cell: without the list of valid methods and local paths."""
    error = re.sub(r" Valid methods: .*", "", error).replace(f"{OUT}/family/", "")
    return error.replace("|", "\\|")[:160]


def _names_reason(error: str, name: str) -> bool:
    """Whether a refusal names the parameter the recipe gets wrong (the recipe's own
    name, which weightops quotes, does not count)."""
    return "epsilon" in error.replace(name, "").lower()


def derived_recipes(family: dict[str, Path]) -> dict[str, str]:
    """Recipes made from corpus ones for the arithmetic the corpus reaches in mergekit
    only: the per-model weights mergekit ignores dropped (model_stock, slerp), or the
    method swapped for a sibling mergekit's tests leave out."""
    out = {}

    def load(name: str) -> dict:
        return yaml.safe_load(render(f"test_basic_merges.{name}", family))

    for name in ["test_model_stock_merge", "test_model_stock_filterwise_merge", "test_slerp_merge"]:
        data = load(name)
        for m in data["models"]:
            m.pop("parameters", None)
        out[f"{name}, weights dropped"] = data
    data = load("test_breadcrumbs_merge")
    data |= {"merge_method": "breadcrumbs_ties", "parameters": {"density": 0.8, "gamma": 0.05}}
    out["test_breadcrumbs_merge as breadcrumbs_ties, density 0.8, gamma 0.05"] = data
    data = load("test_ties_merge")
    data["parameters"] |= {"rescale": True, "lambda": 0.7}
    out["test_ties_merge with rescale, lambda 0.7"] = data
    data = load("test_dare_ties_merge")
    data["merge_method"] = "dare_linear"
    out["test_dare_ties_merge as dare_linear"] = data
    data = load("test_della_merge")
    data["merge_method"] = "della_linear"
    out["test_della_merge as della_linear"] = data
    return {k: yaml.safe_dump(v, sort_keys=False) for k, v in out.items()}


def _row(n: str, text: str, results: tuple[dict, dict, dict], counts: dict[str, int]) -> str:
    """One table row; counts what it found."""
    mk, ours, exact = (r[n] for r in results)
    data = yaml.safe_load(text)
    method = data["merge_method"]
    expected_error = n in EXPECT_ERROR
    mk_ok, wo_ok = mk["ok"], ours["ok"]
    if expected_error:
        # Refused, and for the reason the recipe is meant to be refused.
        mk_ok = not mk_ok and _names_reason(mk["error"], n)
        wo_ok = not ours["ok"] and _names_reason(ours["error"], n)
    counts["mk"] += mk_ok
    counts["wo"] += wo_ok
    ident = abs_ = ulp = files = "–"
    note = ""
    if expected_error:
        note = f"meant to be refused ({EXPECT_ERROR[n]})"
        if not wo_ok:
            note += f"; weightops: {_short(ours['error'])}"
    elif not mk_ok:
        note = f"mergekit: {_short(mk['error'])}"
    elif not wo_ok:
        note = f"weightops: {_short(ours['error'])}"
    folder = _folder(n)
    if not expected_error and mk_ok and wo_ok:
        a, b = OUT / "mergekit" / folder, OUT / "weightops" / folder
        files = side_files(a, b)
        if "tokenizer differs" in files and _empty_tokenizer(a) and _tokenizer(b) is None:
            note = (
                "the input has no tokenizer files; mergekit writes an empty one (0 tokens), "
                "weightops none"
            )
        if method in RANDOM:
            base = Path(data["base_model"])
            km, lm = random_stats(a, base)
            kw, lw = random_stats(b, base)
            ident = f"random: changed share {kw:.3f} vs {km:.3f}, mean \\|Δ\\| ratio {lw / lm:.3f}"
            if exact["ok"]:
                ke, le = random_stats(OUT / "weightops-mergekit-numerics" / folder, base)
                ident += f"; `--numerics mergekit`: {ke:.3f}, ratio {le / lm:.3f}"
        else:
            counts["deterministic"] += 1
            d = compare_tensors(a, b)
            if not d["same_names"]:
                note = f"default numerics: {d['why']}"
            else:
                abs_, ulp = f"{d['max_abs']:.2e}", f"{d['max_ulp']:.3g}"
                counts["same_default"] += d["identical"]
            if exact["ok"]:
                e = compare_tensors(a, OUT / "weightops-mergekit-numerics" / folder)
                same = e["same_names"] and e["identical"]
                counts["same_exact"] += same
                why = f"max ulp {e['max_ulp']:.3g}" if e["same_names"] else e["why"]
                ident = "yes" if same else f"**no** ({why})"
            else:
                ident = "not run: " + _short(exact["error"])

    def yes(ok: bool) -> str:
        return "yes" if ok else "**no**"

    mk_cell = ("refused" if mk_ok else "**not for that**") if expected_error else yes(mk_ok)
    wo_cell = ("refused" if wo_ok else "**not for that**") if expected_error else yes(wo_ok)
    return f"| `{n}` | {method} | {mk_cell} | {wo_cell} | {ident} | {abs_} | {ulp} | {files} | {note} |"


def _folder(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only recipes whose name contains this")
    args = parser.parse_args()
    ensure_mergekit(VENV, MERGEKIT_VERSION)
    if OUT.exists():
        shutil.rmtree(OUT)
    recipes = OUT / "recipes"
    recipes.mkdir(parents=True)
    family = build_family(OUT / "family")
    texts = {n: render(n, family) for n in config_names()}
    extra = derived_recipes(family)
    names = [n for n in texts if not args.only or args.only in n]
    extra_names = [n for n in extra if not args.only or args.only in n]
    everything = {**texts, **extra}
    todo = names + extra_names
    for n in todo:
        (recipes / f"{_folder(n)}.yaml").write_text(everything[n])
    results = (
        run_mergekit(todo, recipes, OUT / "mergekit"),
        run_ours(todo, everything, OUT / "weightops", "default"),
        run_ours(todo, everything, OUT / "weightops-mergekit-numerics", "mergekit"),
    )
    counts = dict(mk=0, wo=0, same_default=0, same_exact=0, deterministic=0)
    rows = [_row(n, texts[n], results, counts) for n in names]
    extra_counts = dict(counts, mk=0, wo=0, same_default=0, same_exact=0, deterministic=0)
    extra_rows = [_row(n, extra[n], results, extra_counts) for n in extra_names]

    total = len(names)
    body = (
        "Every recipe in mergekit's examples/ and every merge configuration built by its "
        f"tests/test_basic_merges.py, test_tokenizer.py and test_chat_template.py (mergekit "
        f"main at {MERGEKIT_COMMIT}), from tests/mergekit_configs/, with model names mapped "
        "to tiny local bf16 checkpoints (tests/mergekit_corpus.py) and everything else as "
        'published. Both tools run each recipe on the same models. "identical" compares '
        "every output tensor bit for bit with `weightops merge --numerics mergekit`; max "
        "abs and ulp are for the default numerics (fp32 compute); ulps are of the output "
        "dtype at the larger of the two values, so entries that cancel to near zero, "
        "where mergekit's bf16 arithmetic keeps few correct bits, count many. "
        "For the random methods (dare_*, della*) the two tools draw different masks, so "
        "the table compares statistics instead: the share of entries that differ from "
        "the base model and the ratio (weightops/mergekit) of their mean |Δ|, in the default "
        "numerics and with `--numerics mergekit` (mergekit's rescale). A recipe "
        "meant to be refused counts as run when it is refused for that reason.\n\n"
        f"- Command: `python bench/mergekit_parity.py`\n"
        f"- Machine: {machine()}\n"
        f"- Peer: {mergekit_version(VENV)}\n\n"
        f"**mergekit ran {counts['mk']}/{total}; weightops ran {counts['wo']}/{total}; "
        f"of the {counts['deterministic']} deterministic recipes both ran, "
        f"{counts['same_default']} gave identical tensors in the default numerics and "
        f"{counts['same_exact']} with `--numerics mergekit`.**\n\n"
        "| recipe | method | mergekit ran | weightops ran | identical (`--numerics mergekit`) "
        "| max abs diff (default) | max ulp (default) | config.json / tokenizer | note |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Recipes derived from the corpus, for arithmetic it reaches in mergekit only "
        "(per-model weights that mergekit ignores dropped, or a sibling method): "
        f"{extra_counts['same_exact']} of {extra_counts['deterministic']} deterministic "
        "ones identical with `--numerics mergekit`.\n\n"
        "| recipe | method | mergekit ran | weightops ran | identical (`--numerics mergekit`) "
        "| max abs diff (default) | max ulp (default) | config.json / tokenizer | note |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(extra_rows) + "\n"
    )
    print(body)
    if not args.only:
        write_section("mergekit_parity", "mergekit's own recipes: mergekit vs weightops", body)


if __name__ == "__main__":
    main()
