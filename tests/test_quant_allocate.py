"""Calibrated bit allocation: the knapsack, the error curves and the loss sensitivity."""

from __future__ import annotations

import itertools

import pytest
import torch

from weightops.quant import allocate as alloc
from weightops.quant.allocate import allocate, error_curve, options
from weightops.quant.model import part_bits


def test_allocation_of_a_hand_worked_case():
    # Base 4 bits. Within 10: A1+B1 (10 bits, cost 9) beats A0+B2 (10, 11) and A1+B0
    # (8, 12); within 9 the best left is A1+B0 (8 bits, cost 12).
    a = [(2, 10.0), (6, 4.0), (10, 3.0)]
    b = [(2, 8.0), (4, 5.0), (8, 1.0)]
    assert allocate([a, b], 10) == [1, 1]
    assert allocate([a, b], 9) == [1, 0]
    assert allocate([a, b], 4) == [0, 0]
    assert allocate([a, b], 100) == [2, 2]


def _brute_force(choices, budget):
    best = None
    for combo in itertools.product(*(range(len(c)) for c in choices)):
        bits = sum(c[j][0] for c, j in zip(choices, combo, strict=True))
        cost = sum(c[j][1] for c, j in zip(choices, combo, strict=True))
        if bits <= budget and (best is None or cost < best[0] - 1e-12):
            best = (cost, combo)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_cheapest_within_the_budget(seed, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    choices = []
    for _ in range(4):
        base = int(torch.randint(10, 50, (1,), generator=g))
        steps = torch.randint(1, 9, (3,), generator=g).cumsum(0) * 6
        costs = torch.rand(4, generator=g).sort(descending=True).values * 10
        choices.append(
            [(base, float(costs[0]))]
            + [(base + int(s), float(c)) for s, c in zip(steps, costs[1:], strict=True)]
        )
    low = sum(c[0][0] for c in choices)
    for budget in (low, low + 7, low + 30, low + 80):
        cost, _ = _brute_force(choices, budget)
        picks = allocate(choices, budget)
        assert sum(c[j][0] for c, j in zip(choices, picks, strict=True)) <= budget
        assert sum(c[j][1] for c, j in zip(choices, picks, strict=True)) == pytest.approx(cost)
    # A coarse table (few budget units) may give up some cost, never the budget.
    monkeypatch.setattr(alloc, "MAX_UNITS", 3)
    for budget in (low + 7, low + 30, low + 80):
        picks = allocate(choices, budget)
        assert sum(c[j][0] for c, j in zip(choices, picks, strict=True)) <= budget


def test_allocation_below_the_floor_is_refused():
    from weightops.quant.mixed import QuantError

    with pytest.raises(QuantError, match="no 4-bit groups"):
        allocate([[(5, 1.0)], [(5, 1.0)]], 9)


def test_part_bits_count_every_stored_part():
    # A row of 1024 inputs in groups of 64: 16 groups, 4 of them 4-bit, 3 outliers of a
    # 16-bit index and a 16-bit value: codes, scale + zero bytes, map, super-scales.
    row = 2 * 12 * 64 + 4 * 4 * 64 + 16 * 16 + 8 * 2 + 32 + 3 * 32
    assert part_bits((5, 1024), 64, 4, 3) == 5 * row
    assert options(1024, 64) == [0, 4, 8, 12, 16]
    assert options(576, 64) == list(range(10))


def test_error_curve_takes_off_the_largest_gains_per_row():
    # Group 0 of each row sits exactly on a 2-bit grid (no error at 2 bits, nothing to
    # gain from 4); group 1 is spread over 16 levels; group 2 has no importance.
    exact = torch.tensor([0.0, 1.0, 2.0, 3.0]).repeat(4) * 0.1
    spread = torch.arange(16.0) * 0.01
    w = torch.stack(
        [torch.cat([exact, spread, spread * 7]), torch.cat([exact * 2, spread, -spread])]
    )
    h = torch.cat([torch.ones(32), torch.zeros(16)])
    curve = error_curve(w, h, 16, [0, 1, 2, 3])
    assert curve[0] > curve[1] > 0
    # Only group 1 of each row gains: a second or third 4-bit group buys nothing.
    assert curve[2] == pytest.approx(curve[1]) and curve[3] == pytest.approx(curve[1])
    # What is left with group 1 at 4 bits is its 4-bit rounding noise, step²/12 per input.
    assert curve[1] == pytest.approx(2 * 16 * (0.15 / 15) ** 2 / 12, rel=1e-4)


def test_sensitivity_matches_whole_model_gradients(small_llama):
    from transformers import AutoTokenizer

    from weightops.io.checkpoint import Checkpoint
    from weightops.quant.calibrate import LayerwiseCalibration
    from weightops.quant.sensitivity import measure

    folder, model = small_llama
    text = "the quick brown fox jumps over the lazy dog. " * 4
    names = {
        f"model.layers.{i}.{m}.weight"
        for i in (0, 1)
        for m in ("self_attn.v_proj", "mlp.down_proj")
    }
    seen_layers = []
    got = measure(Checkpoint(folder), [text], names, lambda w, h: seen_layers.append(sorted(w)))
    assert [len(s) for s in seen_layers] == [2, 2]

    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids
    sq_out, sq_in, x_in = {}, {}, {}
    handles = []
    for name in names:
        module = model.get_submodule(name[: -len(".weight")])

        def fwd(m, args, out, name=name):
            x_in[name] = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sq_in[name] = x_in[name].square()
            out.register_hook(lambda g: sq_out.__setitem__(name, g.detach().double().square()))

        handles.append(module.register_forward_hook(fwd))
    logits = model(ids).logits[0, :-1]
    torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    for name in names:
        expected = sq_out[name].reshape(-1, sq_out[name].shape[-1]).mean()
        assert got.cost[name] == pytest.approx(float(expected), rel=1e-3)
        torch.testing.assert_close(
            got.importance[name].double(), sq_in[name].mean(0), rtol=1e-4, atol=1e-7
        )
    # The Hessians weighted per token by the mean squared output gradient.
    calibration = LayerwiseCalibration(Checkpoint(folder), [text], token_weights=got.token_weights)
    hessians = {**calibration.layer(0), **calibration.layer(1)}
    for name in names:
        s = sq_out[name].reshape(-1, sq_out[name].shape[-1]).mean(-1)
        x = x_in[name]
        expected = (x * s[:, None]).T @ x / s.sum()
        torch.testing.assert_close(hessians[name].double(), expected, rtol=1e-3, atol=1e-6)
    # Those without weights keep the plain mean x xᵀ.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert q not in got.token_weights and q in hessians


@pytest.mark.parametrize("avg_bits", [2.6, 3.3])
def test_calibrated_plan_stays_within_the_budget(small_llama, avg_bits):
    from weightops.io.checkpoint import Checkpoint
    from weightops.quant.allocate import calibrated_plan
    from weightops.quant.mixed import bits_per_weight

    folder, _ = small_llama
    ckpt = Checkpoint(folder)
    names = [n for n in ckpt.tensors if n.endswith("proj.weight")]
    plan = {n: (0, 0) for n in names}
    text = "the quick brown fox jumps over the lazy dog. " * 6
    new, weights = calibrated_plan(ckpt, [text], plan, 64, avg_bits)
    assert set(weights) == set(plan)
    assert set(new) == set(plan)
    bits = weights = 0
    for name, (k4, outliers) in new.items():
        out_f, in_f = ckpt.tensors[name].shape
        assert k4 in options(in_f, 64) and outliers == 0
        bits += out_f * in_f * bits_per_weight(in_f, 64, k4)
        weights += out_f * in_f
    assert bits / weights <= avg_bits
    # Every 4-bit group lowers the error of these random weights: what is left of the
    # budget cannot pay for one more step (2 more bits for 64 weights in every row) of
    # any matrix that has room for it.
    steps = [
        ckpt.tensors[n].shape[0] * 64 * 2 * (options(ckpt.tensors[n].shape[1], 64)[1])
        for n, (k4, _) in new.items()
        if k4 < options(ckpt.tensors[n].shape[1], 64)[-1]
    ]
    assert not steps or avg_bits * weights - bits < min(steps)
