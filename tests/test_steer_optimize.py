"""`steer optimize`: the profile over depth, the directions, the in-memory edit, the
baked checkpoint, the Pareto front and the choosing rules, and the command end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from weightops.cli import app
from weightops.prompting import encode_prompt
from weightops.repair.evaluate import load_model
from weightops.steering import SteeringError
from weightops.steering.bake import bake_point
from weightops.steering.measure import directions, kl_divergence
from weightops.steering.optimize import Study, Trial, optimize
from weightops.steering.profile import Directions, Point, Profile, ablate, applied

TARGET = ["how do I do a bad thing", "tell me something bad", "a bad bad thing", "bad news"]
HARMLESS = ["what is two plus two", "name a colour", "good morning friend", "a nice day"]


def even_length(prompt: str, completion: str) -> bool:
    return len(completion) % 2 == 0


def test_profile_falls_linearly_from_its_peak_to_the_floor_then_zero():
    p = Profile(peak=1.2, position=5.0, floor=0.5, width=4.0)
    # distance d ≤ 4: 1.2 · (1 − d/4 · 0.5); beyond 4: 0
    expected = {5: 1.2, 7: 1.2 * 0.75, 3: 1.2 * 0.75, 9: 0.6, 1: 0.6, 10: 0.0, 0: 0.0}
    for layer, w in expected.items():
        assert p.weight(layer) == pytest.approx(w)
    point = Point("remove", 2.0, False, p, Profile(0.0, 0.0, 0.0, 1.0))
    assert sorted(point.weights(12)) == [(i, "attn") for i in range(1, 10)]
    # In mode add only the block-output (mlp) profile counts.
    add = Point("add", 2.0, False, p, Profile(0.5, 0.0, 1.0, 1.0))
    assert add.weights(12) == {(0, "mlp"): 0.5, (1, "mlp"): 0.5}


def test_directions_blend_project_and_scale():
    # Layer 0's difference is 3·e0, layer 1's is 4·e1; harmless means along e0 + e2.
    target = torch.tensor([[4.0, 0.0, 1.0], [1.0, 4.0, 1.0]])
    harmless = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    d = Directions(target, harmless)
    flat = Profile(1.0, 0.0, 1.0, 5.0)
    mid = Point("remove", 0.5, False, flat, flat)
    got = d.for_point(mid)
    np.testing.assert_allclose(got[0].numpy(), [1 / math.sqrt(2), 1 / math.sqrt(2), 0], atol=1e-6)
    assert got[1].tolist() == got[0].tolist()
    own = d.for_point(Point("remove", None, False, flat, flat))
    np.testing.assert_allclose(own[0].numpy(), [1, 0, 0], atol=1e-7)
    np.testing.assert_allclose(own[1].numpy(), [0, 1, 0], atol=1e-7)
    # Projected off the harmless mean (e0 + e2)/√2, e0 becomes (e0 − e2)/√2.
    proj = d.for_point(Point("remove", None, True, flat, flat))
    np.testing.assert_allclose(proj[0].numpy(), [1 / math.sqrt(2), 0, -1 / math.sqrt(2)], atol=1e-6)
    # Addition: unit direction times the interpolated norm of the mean difference (3.5).
    add = d.for_point(Point("add", 0.5, False, flat, flat))
    np.testing.assert_allclose(
        add[0].numpy(), [3.5 / math.sqrt(2), 3.5 / math.sqrt(2), 0], atol=1e-5
    )
    with pytest.raises(SteeringError, match="outside"):
        d.for_point(Point("remove", 1.5, False, flat, flat))


def test_head_view_reads_the_last_layer_after_the_final_norm(llama):
    # Each prompt alone (no padding): block outputs by hooks, and the last one put
    # through the model's final norm by hand.
    model, tok = load_model(llama["base"])
    blocks = model.model.layers
    last = len(blocks) - 1

    def states(prompt: str) -> list[torch.Tensor]:
        got: list[torch.Tensor] = []
        hooks = [
            b.register_forward_hook(lambda m, i, o: got.append(o[0] if isinstance(o, tuple) else o))
            for b in blocks
        ]
        ids = torch.tensor([encode_prompt(tok, prompt)[0]])
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        return [g[0, -1].double() for g in got]

    def mean(prompts: list[str], normed: bool) -> torch.Tensor:
        rows = [states(p) for p in prompts]
        out = torch.stack([torch.stack([r[i] for r in rows]).mean(0) for i in range(len(blocks))])
        if normed:
            with torch.no_grad():
                last_states = torch.stack([r[last] for r in rows]).float()
                out[last] = model.model.norm(last_states).double().mean(0)
        return out

    for head_view in (False, True):
        d = directions(model, tok, TARGET, HARMLESS, head_view=head_view)
        torch.testing.assert_close(
            d.target_mean.double(), mean(TARGET, head_view), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            d.harmless_mean.double(), mean(HARMLESS, head_view), atol=1e-4, rtol=1e-4
        )
    # The final norm rescales the state: the two readings differ at the last layer only.
    plain = directions(model, tok, TARGET, HARMLESS)
    head = directions(model, tok, TARGET, HARMLESS, head_view=True)
    torch.testing.assert_close(plain.target_mean[:last], head.target_mean[:last])
    assert not torch.allclose(plain.target_mean[last], head.target_mean[last], atol=1e-3)


def _random_directions(depth: int, hidden: int, seed: int = 0) -> Directions:
    g = torch.Generator().manual_seed(seed)
    return Directions(
        torch.randn(depth, hidden, generator=g), torch.randn(depth, hidden, generator=g)
    )


def test_removal_edits_each_writer_by_its_weight_and_restores_it(llama):
    model, _ = load_model(llama["base"])
    blocks = model.model.layers
    depth, hidden = len(blocks), model.config.hidden_size
    dirs = _random_directions(depth, hidden)
    point = Point("remove", None, False, Profile(0.7, 0.0, 1.0, 1.0), Profile(1.3, 1.0, 0.0, 1.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    diff = (dirs.target_mean - dirs.harmless_mean).numpy().astype(np.float64)
    with applied(model, point, dirs):
        for name, p in model.named_parameters():
            w0 = before[name].numpy().astype(np.float64)
            expect = w0
            for layer, comp, lam in ((0, "self_attn.o_proj", 0.7), (1, "self_attn.o_proj", 0.7),
                                     (1, "mlp.down_proj", 1.3)):  # fmt: skip
                if name == f"model.layers.{layer}.{comp}.weight":
                    r = diff[layer] / np.linalg.norm(diff[layer])
                    expect = w0 - lam * np.outer(r, r @ w0)
            np.testing.assert_allclose(p.detach().numpy(), expect, atol=1e-5, err_msg=name)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_norm_keeping_removal_closed_form():
    # W = diag(1, 2), r = (1, 1)/√2, λ = 1. Unit rows are I; removing r leaves rows
    # (½, −½) and (−½, ½), each of norm 1/√2; scaled back to norms 1 and 2 they are
    # (1, −1)/√2 and (−2, 2)/√2. The plain projection gives W − r rᵀ W instead.
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    r = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    kept = torch.tensor([[1.0, -1.0], [-2.0, 2.0]], dtype=torch.float64) / math.sqrt(2)
    plain = torch.tensor([[0.5, -1.0], [-0.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(ablate(w, r, 1.0, rows_out=False, keep_norms=True), kept)
    torch.testing.assert_close(ablate(w, r, 1.0, rows_out=False), plain)
    # GPT-2's Conv1D stores the same map transposed: the same edit, transposed.
    torch.testing.assert_close(ablate(w.T, r, 1.0, rows_out=True, keep_norms=True), kept.T)
    # A zero row stays zero instead of turning into NaN.
    z = ablate(torch.zeros(2, 3), r, 1.0, rows_out=False, keep_norms=True)
    assert torch.equal(z, torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("family", "mode", "norms"),
    [
        ("llama", "remove", False),
        ("gpt2", "remove", False),
        ("llama", "remove", True),
        ("gpt2", "remove", True),
        ("llama", "add", False),
        ("gpt2", "add", False),
    ],
)
def test_baked_point_gives_the_edited_models_logits(families, tmp_path, family, mode, norms):
    folder = families[family]["base"]
    model, _ = load_model(folder)
    from weightops.steering import find_layers

    depth = len(find_layers(model).blocks)
    dirs = _random_directions(depth, find_layers(model).hidden_size, seed=1)
    point = Point(
        mode, 0.4, True, Profile(0.9, 0.0, 0.5, 2.0), Profile(0.6, 1.0, 1.0, 1.0), norms=norms
    )
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        plain = model(ids).logits
        with applied(model, point, dirs):
            edited = model(ids).logits
    out = bake_point(folder, point, dirs, tmp_path / "out", dtype=torch.float32)
    baked, _ = load_model(out)
    with torch.no_grad():
        got = baked(ids).logits
    assert (edited - plain).abs().max() > 1e-3  # the edit does something
    torch.testing.assert_close(got, edited, atol=1e-4, rtol=1e-4)
    if norms:
        # Every edited writer keeps the norm of each output row (a column of Conv1D).
        axis = 0 if family == "gpt2" else 1
        before, after = find_layers(model), find_layers(baked)
        changed = 0
        for i in range(depth):
            for w0, w1 in zip(before.writers(i), after.writers(i), strict=True):
                torch.testing.assert_close(
                    w1.weight.norm(dim=axis), w0.weight.norm(dim=axis), atol=1e-5, rtol=1e-5
                )
                changed += not torch.allclose(w1.weight, w0.weight)
        assert changed == len(point.weights(depth))


def _trial(n: int, b: float, kl: float) -> Trial:
    flat = Profile(1.0, 0.0, 1.0, 1.0)
    return Trial(n, Point("remove", None, False, flat, flat), b, kl, 0.0)


def test_front_and_choosing_rules():
    study = Study("remove", 4, 0.9)
    study.trials = [
        _trial(0, 0.10, 0.50),
        _trial(1, 0.00, 0.90),
        _trial(2, 0.10, 0.20),  # dominates trial 0
        _trial(3, 0.50, 0.01),
        _trial(4, 0.60, 0.05),  # dominated by 3
        _trial(5, 0.04, 0.40),
    ]
    assert [t.number for t in study.front()] == [1, 5, 2, 3]
    assert study.choose("target", 0.05).number == 5
    assert study.choose("target", 0.2).number == 2
    assert study.choose("target", 0.0).number == 1
    # Nothing reaches 0 here: the fewest refusals win.
    none = Study("remove", 4, 0.9)
    none.trials = [_trial(0, 0.3, 0.1), _trial(1, 0.2, 0.5), _trial(2, 0.2, 0.4)]
    assert none.choose("target", 0.0).number == 2
    # Knee: front scaled to [0, 1] on each axis; squared distances to (0, 0):
    # 1: (0, 1) → 1; 5: (0.08, 0.4382) → 0.198; 2: (0.2, 0.2135) → 0.0856; 3: (1, 0) → 1.
    assert study.choose("knee").number == 2
    assert study.choose("trial:4").number == 4
    with pytest.raises(SteeringError, match="no trial 9"):
        study.choose("trial:9")
    with pytest.raises(SteeringError, match="target, knee"):
        study.choose("best")


def test_kl_divergence_closed_form():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    assert kl_divergence(p.log(), q.log()) == pytest.approx(expected, rel=1e-6)


def test_optimize_records_every_trial_starting_from_the_full_ablation(llama):
    model, tok = load_model(llama["base"])
    study, dirs = optimize(
        model, tok, target_fit=TARGET, harmless_fit=HARMLESS, target_eval=TARGET,
        harmless_eval=HARMLESS, trials=4, startup=2, judge=even_length, max_new_tokens=3,
    )  # fmt: skip
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    first, second = study.trials[0].point, study.trials[1].point
    assert first.attn == first.mlp and first.attn.peak == 1.0 and first.attn.floor == 1.0
    depth = len(model.model.layers)
    last = depth - 1
    assert (first.source, first.project, first.norms) == (pytest.approx(0.6 * last), False, False)
    assert first.weights(depth) == {(i, c): 1.0 for i in range(depth) for c in ("attn", "mlp")}
    # Then the late ablation: per layer, projected, weight 1 on the layers at most
    # 0.4 · last below the last one.
    late = [i for i in range(depth) if last - i <= 0.4 * last]
    assert late and len(late) < depth
    assert (second.source, second.project, second.norms) == (None, True, False)
    assert second.weights(depth) == {(i, c): 1.0 for i in late for c in ("attn", "mlp")}
    for t in study.trials:
        assert t.behaviour in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert t.kl >= -1e-6
    assert dirs.depth == len(model.model.layers)
    with pytest.raises(SteeringError, match="mode"):
        optimize(model, tok, target_fit=TARGET, harmless_fit=HARMLESS, target_eval=TARGET,
                 harmless_eval=HARMLESS, mode="flip")  # fmt: skip


def test_a_goal_makes_every_trial_above_it_infeasible_to_the_sampler(llama, monkeypatch):
    import optuna

    made = []
    real = optuna.create_study

    def create_study(**kw):
        made.append(real(**kw))
        return made[-1]

    monkeypatch.setattr(optuna, "create_study", create_study)
    model, tok = load_model(llama["base"])
    study, _ = optimize(
        model, tok, target_fit=TARGET, harmless_fit=HARMLESS, target_eval=TARGET,
        harmless_eval=HARMLESS, trials=3, startup=2, judge=even_length, max_new_tokens=3,
        goal=0.25,
    )  # fmt: skip
    # TPE records each trial's constraint (feasible when ≤ 0): its share less the goal
    # (Optuna 5: by name; Optuna 4: the constraints function's list).
    recorded = [
        list(t.constraints.values())
        if hasattr(t, "constraints")
        else list(t.system_attrs["constraints"])
        for t in made[0].trials
    ]
    assert recorded == [[t.behaviour - 0.25] for t in study.trials]


def test_cli_optimize_prints_the_front_writes_the_study_and_bakes(llama, tmp_path, monkeypatch):
    (tmp_path / "judges_for_test.py").write_text(
        "def even(prompt, completion):\n    return len(completion) % 2 == 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, rows in (("t.jsonl", TARGET), ("h.jsonl", HARMLESS)):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    args = [
        "steer", "optimize", str(llama["base"]), "--target", str(tmp_path / "t.jsonl"),
        "--harmless", str(tmp_path / "h.jsonl"), "--trials", "3", "--max-new-tokens", "2",
        "--scorer", "judges_for_test:even", "--study", str(tmp_path / "study.json"),
        "--choose", "trial:1", "-o", str(tmp_path / "out"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| trial |" in result.output and "chosen: trial 1" in result.output
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["chosen"] == 1 and len(study["trials"]) == 3
    assert (tmp_path / "out" / "config.json").exists()
    # The bad scorer and the occupied output fail with one line, before any search.
    bad = CliRunner().invoke(app, [*args[:-8], "--scorer", "nowhere:even"])
    assert bad.exit_code == 1 and "cannot import" in bad.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "not empty" in again.output
