"""The stopping rules of restoration's settings search (weightops.repair.search_stop and
their use in weightops.repair.crossfit), on hand-made candidate sequences: every
expected decision is worked out in the comment above it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_state

from weightops.compat import causal_lm
from weightops.repair.crossfit import leader_points
from weightops.repair.data import Example
from weightops.repair.heldout import Candidate
from weightops.repair.search import search_restore
from weightops.repair.search_stop import behind, lowest_by, reach, stalled


def test_reach_is_the_last_step_whose_pooled_rate_can_still_win():
    # Fold A holds out 16 of 32 harmful prompts. Its rates: 1.0, 0.5, 0.25, 0.125 at
    # steps 4..16, i.e. 16, 8, 4, 2 harmful answers; pooled at least 16/32, 8/32, 4/32,
    # 2/32 = 0.5, 0.25, 0.125, 0.0625.
    fold_a = {4: 1.0, 8: 0.5, 12: 0.25, 16: 0.125}
    # Best so far 0.094 (3/32): only step 16 (at least 0.0625) can still win.
    assert reach(fold_a, 16, 32, 0.094) == 16
    # Best 0.25 exactly: a tie can still win on the task, so step 8 counts; the last
    # such step is 16.
    assert reach(fold_a, 16, 32, 0.25) == 16
    # Best 0 (a harmless candidate with the task): no step of fold A is harmless.
    assert reach(fold_a, 16, 32, 0.0) == 0
    # Fold A reaches 0 at step 8 and goes back up at 12: fold B to step 8 only.
    assert reach({4: 0.5, 8: 0.0, 12: 0.25}, 16, 32, 0.0) == 8
    # Nothing found yet (the fine-tune, harmful rate 1): every step.
    assert reach(fold_a, 16, 32, 1.0) == 16


def test_reach_weighs_fold_a_by_its_share_of_the_held_out_prompts():
    # Fold A holds out 29 of 64: 0.862 there is 25 answers, pooled at least 25/64 =
    # 0.39; against a best of 0.4 it counts, against 0.38 it does not.
    assert reach({4: 25 / 29}, 29, 64, 0.40) == 4
    assert reach({4: 25 / 29}, 29, 64, 0.38) == 0


def test_stalled_needs_two_checkpoints_without_a_new_low():
    # Fine-tune at 1.0, then 1.0 and 1.0: neither is below 1.0.
    assert stalled([1.0, 1.0], start=1.0)
    # One checkpoint is not enough to tell.
    assert not stalled([1.0], start=1.0)
    # 0.94 at the second checkpoint is a new low.
    assert not stalled([1.0, 0.94], start=1.0)
    # 0.25, 0.19, then 0.06 four times (the real model's fold A): the last two are not
    # below the 0.06 before them.
    assert stalled([0.25, 0.19, 0.06, 0.06, 0.06, 0.06], start=1.0)
    # A rise then back to the old low: not lower than 0.2, so stalled.
    assert stalled([0.2, 0.5, 0.2], start=1.0)


def test_lowest_by_takes_only_leaders_at_or_before_the_step():
    leaders = [(4, 0.25), (8, 0.19), (12, 0.06)]
    assert lowest_by(leaders, 2) is None
    assert lowest_by(leaders, 8) == 0.19
    assert lowest_by(leaders, 40) == 0.06


def test_behind_stops_a_stalled_trajectory_far_above_the_leader():
    # The real model: all 30 blocks, fold A 0.25, 0.19 at steps 4, 8 (both kept the
    # task); 15 blocks then 1.0, 1.0 from a fine-tune at 1.0: stalled, and 1.0 > 0.19 +
    # 0.25 at step 8: stop after two checkpoints.
    leaders = [(4, 0.25), (8, 0.19), (12, 0.06), (16, 0.06)]
    assert not behind([(4, 1.0)], 1.0, leaders)
    assert behind([(4, 1.0), (8, 1.0)], 1.0, leaders)
    # Not stalled (0.94 a new low at step 8): it goes on, however far behind.
    assert not behind([(4, 1.0), (8, 0.94)], 1.0, leaders)
    # 0.4 at steps 4, 8, 12: at step 8 the first 0.4 was a new low under the
    # fine-tune's 1.0 (not stalled); at step 12 the last two are not under 0.4
    # (stalled), and 0.4 > 0.06 + 0.25 = 0.31, the leader's low by step 12: stop.
    assert not behind([(4, 0.4), (8, 0.4)], 1.0, leaders)
    assert behind([(4, 0.4), (8, 0.4), (12, 0.4)], 1.0, leaders)
    # 0.3 instead: 0.3 is not more than 0.31 above: it goes on.
    assert not behind([(4, 0.3), (8, 0.3), (12, 0.3)], 1.0, leaders)
    # No earlier trajectory: nothing to be behind (a plateau alone never stops).
    assert not behind([(4, 1.0), (8, 1.0), (12, 1.0)], 1.0, [])
    # The leader's first kept point is at step 8: nothing to compare with at step 4.
    assert not behind([(2, 1.0), (4, 1.0)], 1.0, [(8, 0.0)])
    assert behind([(4, 1.0), (8, 1.0)], 1.0, [(8, 0.5)])


def test_leaders_are_fold_a_points_of_candidates_that_keep_the_task():
    trajectories = [
        {"layers": 3, "rollback": False, "fold": 0, "points": [(4, 1.0, 0.9), (8, 0.6, 0.9)]},
        {"layers": 3, "rollback": False, "fold": 1, "points": [(4, 0.8, 0.9), (8, 0.1, 0.7)]},
    ]
    # Step 4 kept the task when pooled (0.9); step 8 did not (0.8 < 0.85); fold B's
    # points are never leaders.
    candidates = [
        Candidate(0, 0, False, 1.0, 0.9, 0),
        Candidate(3, 4, False, 0.9, 0.9, 10),
        Candidate(3, 8, False, 0.35, 0.8, 20),
    ]
    assert leader_points(trajectories, candidates, 0.85) == [(4, 1.0)]
    # The same step of another depth or mode is not this trajectory's candidate.
    other = [Candidate(2, 8, False, 0.1, 0.9, 5), Candidate(3, 8, True, 0.1, 0.9, 5)]
    assert leader_points(trajectories, other, 0.85) == []


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from weightops.demo import fine_tune, tiny_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("search-stop")
    base = tiny_model(root / "base", "llama", seed=0, layers=2, shard_size="60KB")
    yield {"base": base, "ft": fine_tune(base, root / "ft", seed=1, shard_size="60KB")}
    torch.set_num_threads(before)


def load(folder: Path):
    from transformers import AutoTokenizer

    return causal_lm(folder, torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def test_search_stops_a_depth_that_cannot_catch_up(llama):
    # Both blocks hold 73 728 pool weights, block 0 alone 36 864: 0.1 % per step is 74
    # weights at depth 2 and 37 at depth 1. A completion is harmful while fewer than
    # 100 weights are restored; the task never moves (1.0).
    # Depth 2, fold A: harmful 1.0, 0, 0 at steps 1-3 (148 and 222 weights): two
    # harmless points with the task, it stops at step 3; fold B (best so far: the
    # fine-tune, 1.0) runs to step 3 too. Best: step 2, pooled harmful rate 0.
    # Depth 1, fold A: 1.0 at step 1 (37 weights) and at step 2 (74): stalled, and 1.0
    # is more than 0.25 above depth 2's 0 by step 2: it stops at step 2, where it would
    # have gone on to step 4. Its rates never allow a pooled 0: fold B does not run.
    model, tok = load(llama["ft"])
    aligned, _ = load(llama["base"])
    ft_state = load_state(llama["ft"])

    def restored_now() -> int:
        return sum(int((p.detach() != ft_state[n]).sum()) for n, p in model.named_parameters())

    harmful = [Example(f"harm: make thing {i}\n", f"Sure, thing {i // 2}.") for i in range(16)]
    task = [Example(f"copy: ab{c}\n", f"ab{c}") for c in "cdefghijklmnopqr"]
    found = search_restore(
        model, aligned, tok, harmful, task, judge=lambda p, c: restored_now() < 100,
        task_metric=lambda m: 1.0, depths=[2, 1], fraction=0.001, steps=12,
        checkpoint_every=1, rollback_fraction=0.0, progress=False,
    )  # fmt: skip
    runs = [(t["layers"], t["fold"], [p[:2] for p in t["points"]]) for t in found.trajectories]
    assert runs == [
        (2, 0, [(1, 1.0), (2, 0.0), (3, 0.0)]),
        (2, 1, [(1, 1.0), (2, 0.0), (3, 0.0)]),
        (1, 0, [(1, 1.0), (2, 1.0)]),
    ]
    assert found.evaluations == 2 + 3 + 3 + 2
    assert (found.chosen.layers, found.chosen.step, found.chosen.harmful) == (2, 2, 0.0)
