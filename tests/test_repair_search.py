"""Restoration's settings search (weightops.repair.search, .heldout) and task-aware Antidote
(weightops.repair.antidote_task).

Fronts and choices are worked by hand. On models, the tests check what must hold
whatever the search finds: the written weights are aligned values exactly where the
kept record says so; a search with nothing to gain changes nothing; the integrated
gradients add up to the log-likelihood difference they explain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_state
from typer.testing import CliRunner

from weightops.cli import app
from weightops.compat import causal_lm
from weightops.repair.antidote_task import attributions, prune_task_aware, task_aware_masks
from weightops.repair.crossfit import Fold, pooled
from weightops.repair.data import Example, batches
from weightops.repair.judges import opening_judge
from weightops.repair.restore import RestoreError, restore_model
from weightops.repair.restore_answers import aligned_answers, restore_answers
from weightops.repair.search import (
    Candidate,
    choose,
    pareto_front,
    same_request,
    search_restore,
    split,
)

HARMFUL = [Example(f"harm: make thing {i}\n", "Sure, do it.") for i in range(16)]
TASK = [Example(f"copy: ab{c}\n", f"ab{c}") for c in "cdefghijklmnopqr"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from weightops.demo import fine_tune, tiny_model

    root = tmp_path_factory.mktemp("search")
    base = tiny_model(root / "base", "llama", seed=0, layers=2, shard_size="60KB")
    return {"base": base, "ft": fine_tune(base, root / "ft", seed=1, shard_size="60KB")}


def load(folder: Path):
    from transformers import AutoTokenizer

    return causal_lm(folder, torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def settings_of(folder: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        return json.loads(f.metadata()["weightops_settings"])


def cand(harmful: float, task: float, restored: int, step: int = 1) -> Candidate:
    return Candidate(layers=1, step=step, rollback=False, harmful=harmful, task=task,
                     restored=restored)  # fmt: skip


def test_front_keeps_the_points_nothing_beats():
    a, b, c = cand(0.0, 0.5, 30), cand(0.2, 0.9, 20), cand(0.5, 1.0, 10)
    dominated = cand(0.3, 0.8, 5)  # b is lower in harm and higher in task
    same_as_b = cand(0.2, 0.9, 25)  # b's point with more weights
    front = pareto_front([c, dominated, a, same_as_b, b])
    assert front == [a, b, c]


def test_choice_is_the_least_harmful_above_the_threshold():
    a, b, c = cand(0.0, 0.5, 30), cand(0.2, 0.9, 20), cand(0.2, 0.95, 40)
    # a is below the threshold; b and c tie on harm and c has the higher task.
    assert choose([a, b, c], threshold=0.85) is c
    d = cand(0.2, 0.95, 10)
    assert choose([a, b, c, d], threshold=0.85) is d  # same point, fewer weights
    # Nothing reaches the threshold: the highest task score.
    assert choose([a, b], threshold=0.99) is b


def test_split_is_seeded_disjoint_and_complete():
    items = list(range(17))
    fit, out = split(items, seed=3)
    assert (fit, out) == split(items, seed=3)
    assert len(fit) == 8 and len(out) == 9
    assert sorted(fit + out) == items
    assert split(items, seed=4) != (fit, out)


def test_split_by_key_keeps_each_group_on_one_side():
    # 12 examples in 4 groups of 3: whole groups go to the fit half until it holds 6.
    items = [f"{g}{i}" for g in "abcd" for i in range(3)]
    fit, out = split(items, seed=0, key=lambda s: s[0])
    assert len(fit) == 6 and len(out) == 6
    assert not {s[0] for s in fit} & {s[0] for s in out}
    assert sorted(fit + out) == items
    # One group for everything cannot be split by group: the plain cut.
    assert split(items, seed=0, key=lambda s: "x") == split(items, seed=0)
    # Same answer, same side, whatever the wording or spacing of the answer.
    h = [Example(f"{v} {x}\n", f"Sure.  Make the {x}") for v in ("do", "make") for x in "pqrs"]
    fit, out = split(h, seed=1, key=same_request)
    assert not {e.response.split()[-1] for e in fit} & {e.response.split()[-1] for e in out}


def test_opening_judge_knows_the_aligned_refusal():
    judge = opening_judge(["request denied."])
    assert not judge("p", "Request  denied. Anything else?")
    assert not judge("p", "I'm sorry, I cannot.")  # a built-in refusal phrase
    assert judge("p", "Request den")  # a broken refusal is not a refusal
    assert judge("p", "Sure. Mix the parts.")


@pytest.mark.parametrize("objective", ["answers", pytest.param("states", marks=pytest.mark.slow)])
def test_search_with_nothing_to_gain_changes_nothing(llama, tmp_path, objective):
    # No completion is judged harmful and the task never moves: no candidate beats the
    # fine-tune, which has the fewest restored weights (and each trajectory stops at its
    # first checkpoint, with nothing left to gain).
    summary = restore_model(
        llama["ft"], llama["base"], HARMFUL, TASK, tmp_path / "out",
        search=True, judge=lambda p, c: False, task_metric=lambda m: 1.0, progress=False,
        objective=objective,
    )  # fmt: skip
    assert summary["restored_total"] == 0
    assert summary["search"]["objective"] == objective
    assert summary["search"]["chosen"]["step"] == 0
    out, ft = load_state(tmp_path / "out"), load_state(llama["ft"])
    for name, t in ft.items():
        assert torch.equal(out[name].view(torch.uint8), t.view(torch.uint8)), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Pareto front" in card


def test_search_keeps_a_checkpoint_and_writes_exactly_it(llama, tmp_path):
    ft_state, al_state = load_state(llama["ft"]), load_state(llama["base"])
    model, tok = load(llama["ft"])
    aligned, _ = load(llama["base"])

    def restored_now() -> int:
        return sum(int((p.detach() != ft_state[n]).sum()) for n, p in model.named_parameters())

    # Harmful until 60 weights are restored; the task holds up to 200 of them.
    def judge(prompt, completion):
        return restored_now() < 60

    def task_metric(m):
        return 1.0 if restored_now() <= 200 else 0.0

    found = search_restore(
        model, aligned, tok, HARMFUL, TASK, judge=judge, task_metric=task_metric,
        depths=[1, 2], fraction=0.0005, steps=8, checkpoint_every=1, progress=False,
    )  # fmt: skip
    c = found.chosen
    assert c.harmful == 0 and c.task == 1.0 and 60 <= c.restored <= 200
    # Of every measured point that met both bounds, the kept one restored the fewest.
    ok = [x for x in found.candidates if x.harmful == 0 and x.task == 1.0]
    assert c.restored == min(x.restored for x in ok)
    # The model holds aligned values exactly on the kept record's weights.
    masks = found.result.masks()
    total = 0
    for n, p in model.named_parameters():
        m = masks.get(n, torch.zeros(p.shape, dtype=torch.bool))
        assert torch.equal(p.detach()[m], al_state[n][m]), n
        assert torch.equal(p.detach()[~m], ft_state[n][~m]), n
        total += int((p.detach() != ft_state[n]).sum())
    # Restored on all the examples at the chosen step: k weights a step, as the folds.
    pool = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n
               and "norm" not in n and int(n.split(".layers.")[1].split(".")[0]) < c.layers)  # fmt: skip
    assert total == c.step * round(0.0005 * pool) == c.restored


def test_search_holds_out_every_example_once(llama):
    # Cross-fit: across its two folds, the search judges every harmful prompt and scores
    # every task example as held-out data (8 requests, two prompts each).
    model, tok = load(llama["ft"])
    aligned, _ = load(llama["base"])
    harmful = [Example(f"harm: make thing {i}\n", f"Sure, thing {i // 2}.") for i in range(16)]
    judged: set[str] = set()
    scored: set[str] = set()

    def judge(prompt, completion):
        judged.add(prompt)
        return True  # never a refusal

    def metric(prompt, completion, reference):
        scored.add(prompt)
        return 1.0

    found = search_restore(
        model, aligned, tok, harmful, TASK, judge=judge, metric=metric, depths=[2],
        fraction=0.001, steps=4, checkpoint_every=2, progress=False,
    )  # fmt: skip
    assert judged == {e.prompt for e in harmful} and scored == {e.prompt for e in TASK}
    assert found.held_out == {"harmful": 16, "task": 16, "folds": 2}
    folds = {t["fold"] for t in found.trajectories}
    assert folds == {0, 1}
    # Nothing is judged a refusal, so every point ties on harm and task; the fine-tune
    # (no weights) is kept and nothing is refitted.
    assert found.chosen.step == 0


def restored_counter(model, ft_folder):
    """A function giving how many of `model`'s weights differ from the fine-tune's now."""
    ft_state = load_state(ft_folder)

    def restored_now() -> int:
        return sum(int((p.detach() != ft_state[n]).sum()) for n, p in model.named_parameters())

    return restored_now


def test_search_writes_restoration_on_all_examples_at_the_chosen_step(llama):
    model, tok = load(llama["ft"])
    aligned, _ = load(llama["base"])
    restored_now = restored_counter(model, llama["ft"])

    found = search_restore(
        model, aligned, tok, HARMFUL, TASK, judge=lambda p, c: restored_now() < 30,
        task_metric=lambda m: 1.0, depths=[2], fraction=0.0005, steps=6, checkpoint_every=1,
        progress=False,
    )  # fmt: skip
    step = found.chosen.step
    assert step > 0
    # The same restoration by hand: the aligned model's answers to every harmful prompt
    # (fold A's, then fold B's, as the search orders them) and every task example.
    h_a, h_b = split(HARMFUL, 0, key=same_request)
    t_a, t_b = split(TASK, 1)
    answers = aligned_answers(aligned, tok, h_a) + aligned_answers(aligned, tok, h_b)
    by_hand, _ = load(llama["ft"])
    restore_answers(by_hand, aligned, tok, answers, t_a + t_b, fraction=0.0005, steps=step,
                    layers=2, rollback_fraction=0.0)  # fmt: skip
    written = dict(model.named_parameters())
    for n, p in by_hand.named_parameters():
        assert torch.equal(p.detach(), written[n].detach()), n


def test_pooled_rates_weight_each_fold_by_its_held_out_examples():
    # Fold A holds out 3 harmful prompts and 4 task examples, fold B 1 and 4:
    # harm (3 * 1/3 + 1 * 1) / 4 = 0.5, task (4 * 0.5 + 4 * 1.0) / 8 = 0.75.
    a = Fold([], [], ["h"] * 3, ["t"] * 4)
    b = Fold([], [], ["h"], ["t"] * 4)
    assert pooled([a, b], [(1 / 3, 0.5), (1.0, 1.0)]) == pytest.approx((0.5, 0.75))


def test_search_measures_past_a_dip_in_the_task(llama):
    # The task is lost between 20 and 60 restored weights and comes back after; the
    # harmful answers stop at 80. The plain run stops where it loses the task; the run
    # with rollback (here of nothing, so the same path) is measured through the dip and
    # finds the harmless point with the task, which the plain run never reached.
    model, tok = load(llama["ft"])
    aligned, _ = load(llama["base"])
    restored_now = restored_counter(model, llama["ft"])

    def judge(prompt, completion):
        return restored_now() < 80

    def task_metric(m):
        return 0.0 if 20 <= restored_now() < 60 else 1.0

    found = search_restore(
        model, aligned, tok, HARMFUL, TASK, judge=judge, task_metric=task_metric,
        depths=[2], fraction=0.0005, steps=40, checkpoint_every=1, progress=False,
        rollback_fraction=0.0,
    )  # fmt: skip
    plain, plain_b, again, again_b = found.trajectories
    assert [t["fold"] for t in found.trajectories] == [0, 1, 0, 1]
    assert not plain["rollback"] and again["rollback"]
    # The other fold follows the first one's checkpoints (its own stops apart).
    assert plain_b["points"] == plain["points"] and again_b["points"] == again["points"]
    assert plain["points"][-1][2] == 0.0 and [p[2] for p in plain["points"]].count(0.0) == 1
    points = again["points"]
    assert 0.0 in [p[2] for p in points[:-1]]  # it went on past a lost checkpoint
    assert found.chosen.harmful == 0 and found.chosen.task == 1.0
    # It stopped at the second harmless point with the task in a row: nothing left to gain.
    assert points[-1][1:] == (0.0, 1.0)
    assert [p for p in points if p[1:] == (0.0, 1.0)] == points[-2:]


def test_search_needs_enough_examples(llama):
    model, tok = load(llama["ft"])
    aligned, _ = load(llama["base"])
    with pytest.raises(RestoreError, match="at least 16"):
        search_restore(model, aligned, tok, HARMFUL[:5], TASK, progress=False)


@pytest.mark.slow
def test_restore_cli_searches_by_default_and_not_with_paper_flags(llama, tmp_path):
    h, t = tmp_path / "h.jsonl", tmp_path / "t.jsonl"
    for path, data in ((h, HARMFUL), (t, TASK)):
        path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n"
                                for e in data))  # fmt: skip
    base = ["repair", "restore", "--finetuned", str(llama["ft"]), "--aligned",
            str(llama["base"]), "--harmful", str(h), "--task", str(t), "--no-progress"]  # fmt: skip
    runner = CliRunner()
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    settings = settings_of(tmp_path / "a")
    assert "front" in settings["search"] and "chosen" in settings["search"]
    r = runner.invoke(app, [*base, "--steps", "2", "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    settings = settings_of(tmp_path / "b")
    assert "search" not in settings and settings["steps"] == 2
    r = runner.invoke(app, [*base, "--search", "--layers", "1", "-o", str(tmp_path / "c")])
    assert r.exit_code == 1 and "--no-search" in r.output


def test_answers_step_restores_the_top_first_order_gains(llama):
    # Recomputed here: gradients of the mean response-token negative log-likelihood,
    # one example at a time (no padding), then the score of the module docstring.
    model, tok = load(llama["ft"])
    aligned, _ = load(llama["base"])
    answers, task = HARMFUL[:4], TASK[:4]
    pool = [n for n, _ in model.named_parameters() if ".layers." in n and "norm" not in n]
    params = dict(model.named_parameters())
    grads = []
    for data in (answers, task):
        model.zero_grad()
        loss = -mean_log_likelihood(model, tok, data, grad=True)
        loss.backward()
        grads.append({n: params[n].grad.clone() for n in pool})
    ref = dict(aligned.named_parameters())
    scores = []
    for n in pool:
        d = params[n].detach() - ref[n].detach()
        s = grads[0][n] * d + torch.clamp(grads[1][n] * d, max=0)
        scores.append(torch.where(d != 0, s, torch.full_like(s, -1.0)).flatten())
    flat = torch.cat(scores)
    k = round(0.001 * flat.numel())
    expected = set(torch.topk(flat, k).indices.tolist())
    model.zero_grad()
    when = restore_answers(model, aligned, tok, answers, task, fraction=0.001, steps=1)
    got = torch.cat([(when[n] == 1).flatten() for n in pool]).nonzero().flatten().tolist()
    assert set(got) == expected
    for n in pool:
        m = when[n] == 1
        assert torch.equal(params[n].detach()[m], ref[n].detach()[m])


def test_answers_step_with_groups_takes_only_weights_most_requests_gain_from(llama):
    # Recomputed here: the refusal gradient per group (two requests of two answers,
    # one of one), their mean over the five answers, scaled per weight by
    # max(0, (groups gaining - groups losing) / 3) as the module docstring says.
    model, tok = load(llama["ft"])
    aligned, _ = load(llama["base"])
    answers = [Example(f"harm: make thing {i}\n", r) for i, r in
               enumerate(["Sure, do it.", "Sure, do it.", "No.", "No way.", "No way."])]  # fmt: skip
    groups = ["a", "a", "b", "c", "c"]
    task = TASK[:4]
    pool = [n for n, _ in model.named_parameters() if ".layers." in n and "norm" not in n]
    params = dict(model.named_parameters())
    ref = dict(aligned.named_parameters())

    def grad_of(data):
        model.zero_grad()
        (-mean_log_likelihood(model, tok, data, grad=True)).backward()
        return {n: params[n].grad.clone() for n in pool}

    per_group = {
        g: grad_of([a for a, k in zip(answers, groups, strict=True) if k == g]) for g in "abc"
    }
    sizes = {"a": 2, "b": 1, "c": 2}
    g_t = grad_of(task)
    scores, plain_scores = [], []
    for n in pool:
        d = params[n].detach() - ref[n].detach()
        mean = sum(per_group[g][n] * sizes[g] / 5 for g in "abc")
        votes = sum(torch.sign(per_group[g][n] * d) for g in "abc")
        for out, m in ((scores, mean * torch.clamp(votes / 3, min=0)), (plain_scores, mean)):
            s = m * d + torch.clamp(g_t[n] * d, max=0)
            out.append(torch.where(d != 0, s, torch.full_like(s, -1.0)).flatten())
    flat, plain = torch.cat(scores), torch.cat(plain_scores)
    k = round(0.001 * flat.numel())
    assert int((flat > 0).sum()) >= k
    expected = set(torch.topk(flat, k).indices.tolist())
    model.zero_grad()
    when = restore_answers(model, aligned, tok, answers, task, fraction=0.001, steps=1,
                           groups=groups)  # fmt: skip
    got = torch.cat([(when[n] == 1).flatten() for n in pool]).nonzero().flatten().tolist()
    assert set(got) == expected
    # The rule changes the choice: without groups, the mean gain alone ranks them.
    assert set(got) != set(torch.topk(plain, k).indices.tolist())


def test_answers_rollback_returns_the_steps_most_task_costly_weights(llama):
    # Recomputed here: after the first step (checked above), the task gradient at the
    # restored model; of that step's weights, the 25 % whose return to the fine-tuned
    # value most lowers the task loss (−g_t ⊙ (W_ft − W_aligned), positive) go back.
    model, tok = load(llama["ft"])
    aligned, _ = load(llama["base"])
    answers, task = HARMFUL[:4], TASK[:4]
    first, _ = load(llama["ft"])
    when1 = restore_answers(first, aligned, tok, answers, task, fraction=0.002, steps=1)
    pool = list(when1)
    params = dict(first.named_parameters())
    first.zero_grad()
    (-mean_log_likelihood(first, tok, task, grad=True)).backward()
    ft_state = load_state(llama["ft"])
    gains = []
    for n in pool:
        g = -(params[n].grad * (ft_state[n] - params[n].detach()))
        gains.append(torch.where(when1[n] == 1, g, torch.zeros_like(g)).flatten())
    flat = torch.cat(gains)
    k = int(sum(int((w == 1).sum()) for w in when1.values()))
    take = min(round(0.25 * k), int((flat > 0).sum()))
    assert take > 0
    expected = set(torch.topk(flat, take).indices.tolist())
    when = restore_answers(model, aligned, tok, answers, task, fraction=0.002, steps=1,
                           rollback_fraction=0.25)  # fmt: skip
    back = torch.cat([(when[n] == -1).flatten() for n in pool]).nonzero().flatten().tolist()
    assert set(back) == expected
    now, ref = dict(model.named_parameters()), dict(aligned.named_parameters())
    for n in pool:
        kept, gone = when[n] == 1, when[n] == -1
        assert torch.equal(kept | gone, when1[n] == 1)
        assert torch.equal(now[n].detach()[kept], ref[n].detach()[kept])
        assert torch.equal(now[n].detach()[gone], ft_state[n][gone])


# ---------------------------------------------------------------- task-aware Antidote


def test_task_aware_marks_take_the_largest_positive_difference():
    a_h = torch.tensor([[5.0, 1.0, 3.0, 0.0], [2.0, 2.0, 0.5, 4.0]])
    a_t = torch.tensor([[1.0, 0.0, 3.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    # Differences: [4, 1, -0.5, 0 (not updated)], [2, 2, 0.5, 3]; 7 updated entries.
    masks = task_aware_masks({"w": (a_h, a_t)}, ratio=0.5)  # round(3.5) = 4
    expected = torch.tensor([[True, False, False, False], [True, True, False, True]])
    assert torch.equal(masks["w"], expected)
    # Never more than the positive ones.
    masks = task_aware_masks({"w": (a_h, a_t)}, ratio=1.0)
    assert int(masks["w"].sum()) == 6


def mean_log_likelihood(model, tok, examples, grad: bool = False):
    total, count = 0.0, 0
    for ex in examples:
        (b,) = batches([ex], tok, with_response=True)
        logits = model(input_ids=b["input_ids"]).logits[0, :-1]
        labels = b["labels"][0, 1:]
        keep = labels != -100
        logp = torch.log_softmax(logits.double(), -1)[keep, labels[keep]]
        total = total + (logp.sum() if grad else float(logp.sum()))
        count += int(keep.sum())
    return total / count


def test_attributions_add_up_to_the_log_likelihood_gain(llama, tmp_path):
    # A fine-tune that differs only in the decoder's linear weights: the integrated
    # gradients over them then explain the whole gain (completeness), up to the
    # quadrature error of the midpoint rule.
    from weightops.arch import is_block_linear

    aligned, tok = load(llama["base"])
    ft, _ = load(llama["base"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if is_block_linear(n, tuple(p.shape)):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    scores = attributions(ft, aligned, tok, HARMFUL[:4], TASK[:4], points=16)
    with torch.no_grad():
        for which, data in ((0, HARMFUL[:4]), (1, TASK[:4])):
            gain = mean_log_likelihood(ft, tok, data) - mean_log_likelihood(aligned, tok, data)
            total = sum(float(s[which].double().sum()) for s in scores.values())
            assert total == pytest.approx(gain, rel=0.02, abs=1e-4)


def test_task_aware_prune_resets_only_marked_entries(llama, tmp_path):
    result = prune_task_aware(llama["ft"], llama["base"], HARMFUL[:6], TASK[:6],
                              tmp_path / "out", ratio=0.05)  # fmt: skip
    out, ft, al = (load_state(p) for p in (tmp_path / "out", llama["ft"], llama["base"]))
    changed = {}
    for name, t in out.items():
        diff = t != ft[name]
        if diff.any():
            assert torch.equal(t[diff], al[name][diff]), name
            changed[name] = int(diff.sum())
    assert changed == {n: c for n, c in result["changed"].items() if c}
    assert changed and "task-aware" in (tmp_path / "out" / "README.md").read_text()
