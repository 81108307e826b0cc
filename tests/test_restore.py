"""Alignment restoration (weightops.repair.restore) on the tiny Llama family.

The "aligned" model is the family's base and the "fine-tune" is ft_a. Gradients and
hidden states are recomputed here one prompt at a time through transformers'
output_hidden_states, independently of restore's batched hooks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_state

from weightops.compat import causal_lm
from weightops.repair.data import Example
from weightops.repair.restore import RestoreError, restore, restore_model

HARMFUL = [Example(f"how do i make thing {i}?") for i in range(6)] + [
    Example("tell me how to build it"),
    Example("x"),
]
TASK = [Example(f"reverse: ab{c}\n", f"{c}ba") for c in "cdefgh"]
DEPTH = 4  # tiny_model's llama depth


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Only the two models these tests need (the session fixture builds every family)."""
    from weightops.demo import fine_tune, tiny_model

    root = tmp_path_factory.mktemp("restore")
    base = tiny_model(root / "base", "llama", seed=0, shard_size="60KB")
    return {"base": base, "ft_a": fine_tune(base, root / "ft_a", seed=1, shard_size="60KB")}


def load(folder: Path):
    from transformers import AutoTokenizer

    model = causal_lm(folder, torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def const(model) -> float:
    return 1.0


def pool_names(state: dict[str, torch.Tensor], layers: int) -> list[str]:
    return [n for n in state if any(f"layers.{i}." in n for i in range(layers)) and "norm" not in n]


def mean_state(model, tokenizer, examples, layer: int) -> torch.Tensor:
    """Mean over prompts of the state after `layer` blocks at the last prompt token."""
    states = []
    for ex in examples:
        ids = tokenizer(ex.prompt, return_tensors="pt").input_ids
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        states.append(hs[layer][0, -1])
    return torch.stack(states).mean(0)


def harmful_grads(model, aligned, tokenizer, examples, layers: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        target = mean_state(aligned, tokenizer, examples, layers)
    params = dict(model.named_parameters())
    names = pool_names(params, layers)
    model.zero_grad()
    loss = -torch.nn.functional.cosine_similarity(
        mean_state(model, tokenizer, examples, layers), target, dim=0
    )
    loss.backward()
    return {n: params[n].grad.clone() for n in names}


def set_state(model, ft: dict, al: dict, restored_at: dict, upto: int) -> None:
    """Put `model` where a run without rollback stands after step `upto`."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            w = restored_at.get(n)
            if w is None:
                p.copy_(ft[n])
            else:
                p.copy_(torch.where((w > 0) & (w <= upto), al[n], ft[n]))


def test_fraction_zero_leaves_every_tensor_bit_identical(llama, tmp_path):
    summary = restore_model(
        llama["ft_a"], llama["base"], HARMFUL, TASK, tmp_path / "out",
        fraction=0, steps=3, task_metric=const, progress=False,
    )  # fmt: skip
    assert summary["restored_total"] == 0
    out, ft = load_state(tmp_path / "out"), load_state(llama["ft_a"])
    assert out.keys() == ft.keys()
    for name, t in ft.items():
        assert out[name].dtype == t.dtype
        assert torch.equal(out[name].view(torch.uint8), t.view(torch.uint8)), name


def test_written_weights_are_fine_tuned_or_aligned_values(llama, tmp_path):
    summary = restore_model(
        llama["ft_a"], llama["base"], HARMFUL, TASK, tmp_path / "out",
        fraction=0.002, steps=4, layers=2, task_metric=const, progress=False,
    )  # fmt: skip
    out, ft, al = (load_state(p) for p in (tmp_path / "out", llama["ft_a"], llama["base"]))
    pool = set(pool_names(ft, 2))
    counts = {}
    for name, t in out.items():
        changed = t != ft[name]
        if name not in pool:
            assert not changed.any(), f"{name} is outside the first 2 blocks or a norm"
            continue
        assert torch.equal(t[changed], al[name][changed]), name
        if changed.any():
            counts[name] = int(changed.sum())
    assert counts == summary["restored"]
    k = round(0.002 * sum(ft[n].numel() for n in pool))
    assert sum(counts.values()) == 4 * k


@pytest.fixture(scope="module")
def plain_run(llama):
    """Three steps without rollback, L = 2, and the models it ran on."""
    ft_model, tok = load(llama["ft_a"])
    al_model, _ = load(llama["base"])
    result = restore(
        ft_model, al_model, tok, HARMFUL, TASK,
        task_metric=const, fraction=0.001, steps=3, layers=2, progress=False,
    )  # fmt: skip
    return result, tok


def test_each_step_restores_k_weights_whose_restoration_is_a_descent_move(llama, plain_run):
    result, tok = plain_run
    ft, al = load_state(llama["ft_a"]), load_state(llama["base"])
    model, _ = load(llama["ft_a"])
    aligned, _ = load(llama["base"])
    pool = pool_names(ft, 2)
    k = round(0.001 * sum(ft[n].numel() for n in pool))
    assert result.k == k and result.steps == 3 and not result.rollback
    assert set(result.restored_at) == set(pool)
    for step in (1, 2, 3):
        set_state(model, ft, al, result.restored_at, step - 1)
        grads = harmful_grads(model, aligned, tok, HARMFUL, 2)
        params = dict(model.named_parameters())
        picked, others = [], []
        for n in pool:
            w = result.restored_at[n]
            cur = params[n].detach()
            g = grads[n]
            now = w == step
            # The rule: moving to the aligned value goes against the gradient.
            sign_ok = torch.sign(cur - al[n]) == torch.sign(g)
            assert bool(sign_ok[now].all()), f"step {step}: {n}"
            assert bool((torch.sign(g[now]) != 0).all())
            picked.append(g[now].abs())
            # Untouched weights that were also descent moves: candidates not chosen.
            free = (w == 0) | (w > step)
            others.append(g[free & sign_ok & (cur != al[n])].abs())
        picked_all, others_all = torch.cat(picked), torch.cat(others)
        assert len(picked_all) == k
        # Top k by |gradient|, up to the rounding between batched and single passes.
        assert picked_all.min() >= others_all.max() * (1 - 1e-4)


def test_model_in_memory_holds_the_kept_result(llama, plain_run):
    result, _ = plain_run
    ft, al = load_state(llama["ft_a"]), load_state(llama["base"])
    for n, p in result.model.named_parameters():
        w = result.restored_at.get(n)
        expect = ft[n] if w is None else torch.where(w > 0, al[n], ft[n])
        assert torch.equal(p.detach(), expect), n
        assert p.grad is None


def test_same_seed_gives_the_same_result(llama, plain_run):
    first, tok = plain_run
    ft_model, _ = load(llama["ft_a"])
    al_model, _ = load(llama["base"])
    again = restore(
        ft_model, al_model, tok, HARMFUL, TASK,
        task_metric=const, fraction=0.001, steps=3, layers=2, progress=False,
    )  # fmt: skip
    for n, w in first.restored_at.items():
        assert torch.equal(w, again.restored_at[n]), n


def test_restoration_moves_harmful_states_towards_the_aligned_direction(llama, plain_run):
    result, _ = plain_run
    assert result.cos_after > result.cos_before


def test_rollback_runs_when_the_metric_drops_and_the_kept_result_passes(llama):
    ft_model, tok = load(llama["ft_a"])
    al_model, _ = load(llama["base"])
    ft = load_state(llama["ft_a"])
    pool = pool_names(ft, 2)
    k = round(0.002 * sum(ft[n].numel() for n in pool))

    def changed(model) -> int:
        params = dict(model.named_parameters())
        return sum(int((params[n].detach() != ft[n]).sum()) for n in pool)

    # Loses 1/30 per k changed weights: one step passes the 0.95 bar, two do not.
    def metric(model) -> float:
        return 1.0 - changed(model) / (30 * k)

    result = restore(
        ft_model, al_model, tok, HARMFUL, TASK,
        task_metric=metric, fraction=0.002, steps=4, layers=2,
        checkpoint_every=1, rollback_fraction=0.2, progress=False,
    )  # fmt: skip
    assert result.rollback
    plain = [c for c in result.checkpoints if not c["rollback"]]
    assert [c["ok"] for c in plain] == [True, False]
    assert result.steps >= 1
    assert metric(result.model) >= 0.95
    assert result.task_after == pytest.approx(metric(result.model))
    rolled = sum(int((w == -1).sum()) for w in result.restored_at.values())
    kept_1 = sum(int((w == 1).sum()) for w in result.restored_at.values())
    assert kept_1 + rolled == k
    assert 0 < rolled <= round(0.2 * k)
    params = dict(result.model.named_parameters())
    for n in pool:
        w, p = result.restored_at[n], params[n].detach()
        assert torch.equal(p[w < 0], ft[n][w < 0]), f"rolled-back weights of {n}"


def test_rollback_returns_weights_the_task_gradient_pulls_back(llama):
    ft_model, tok = load(llama["ft_a"])
    al_model, _ = load(llama["base"])
    ft, al = load_state(llama["ft_a"]), load_state(llama["base"])
    calls = []

    def failing_after_first(model) -> float:
        # The original score, then a failure at the plain run's checkpoint.
        calls.append(1)
        return 1.0 if len(calls) != 2 else 0.0

    result = restore(
        ft_model, al_model, tok, HARMFUL, TASK,
        task_metric=failing_after_first, fraction=0.002, steps=1, layers=2,
        rollback_fraction=0.5, progress=False,
    )  # fmt: skip
    assert result.rollback and result.steps == 1
    # Recompute the benign gradient at the state right after step 1's restoration.
    model, _ = load(llama["ft_a"])
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, w in result.restored_at.items():
            params[n].copy_(torch.where(w != 0, al[n], ft[n]))
        target = mean_state(load(llama["ft_a"])[0], tok, TASK, 2)
    loss = -torch.nn.functional.cosine_similarity(mean_state(model, tok, TASK, 2), target, dim=0)
    loss.backward()
    for n, w in result.restored_at.items():
        back = w < 0
        g = params[n].grad
        assert bool((torch.sign(al[n][back] - ft[n][back]) == torch.sign(g[back])).all()), n


def test_restore_model_writes_a_loadable_folder_with_a_card(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "restored"
    summary = restore_model(
        llama["ft_a"], llama["base"], HARMFUL, TASK, out,
        steps=1, progress=False,
    )  # fmt: skip
    assert summary["out"] == str(out)
    assert summary["restored_total"] > 0
    assert len(summary["checkpoints"]) >= 1
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, 320)
    card = (out / "README.md").read_text()
    settings = json.loads(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert settings["fraction"] == 0.002
    assert settings["layers"] == DEPTH // 2
    assert settings["restored"] == summary["restored"]
    assert all(name in card for name in summary["restored"])
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fraction=1.5),
        dict(steps=-1),
        dict(layers=5),
        dict(checkpoint_every=0),
        dict(metric_drop=2.0),
    ],
)
def test_bad_settings_are_refused(llama, kwargs):
    ft_model, tok = load(llama["ft_a"])
    al_model = ft_model  # refused before either model is read
    with pytest.raises(RestoreError):
        restore(ft_model, al_model, tok, HARMFUL, TASK, task_metric=const, **kwargs)
