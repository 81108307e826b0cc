"""The agreement rule's batched gradients (weightops.repair.agreement) against one
gradient pass per request, the rule's definition, written out here; and the choice of
the largest scores of restoration by answers against torch.topk."""

from __future__ import annotations

import pytest
import torch

from weightops.compat import causal_lm
from weightops.repair.agreement import agreed_grads
from weightops.repair.data import Example, batches
from weightops.repair.restore_answers import _largest_positive

# Groups of 1 to 4 answers (4 is more than the batch of 3 holds) with prompts and
# answers of different lengths, so that batches are padded.
GROUPS = {
    "a": [Example("harm: make a thing\n", "No.")],
    "b": [Example("harm: x\n", "I will not help."), Example("harm: build it now\n", "No way")],
    "c": [Example(f"harm: {'y' * i}\n", "Sure" + "!" * i) for i in range(3)],
    "d": [Example("harm: z\n", "Never.")],
    "e": [Example(f"harm: item {i}\n", "Cannot do " + "it " * i) for i in range(4)],
    "f": [Example("harm: go\n", "Sure, here:"), Example("harm: q\n", "no")],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoTokenizer

    from weightops.demo import fine_tune, tiny_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("agreement")
    # qwen2: its q, k and v projections have biases, which the pool takes too.
    base = tiny_model(root / "base", "qwen2", seed=0, layers=2)
    ft = fine_tune(base, root / "ft", seed=1)
    tok = AutoTokenizer.from_pretrained(ft)
    return causal_lm(ft, torch.float32).eval(), causal_lm(base, torch.float32).eval(), tok


def per_request(model, tok, pool, aligned):
    """One pass per request: ∇ of the mean NLL of its answers' tokens, then the mean
    over answers and the votes sign(g ⊙ (W − W_aligned)) summed over requests."""
    sizes = {k: len(g) for k, g in GROUPS.items()}
    total = sum(sizes.values())
    grads = {}
    for key, group in GROUPS.items():
        model.zero_grad()
        nll, count = 0.0, 0
        for ex in group:
            (b,) = batches([ex], tok, with_response=True)
            logits = model(input_ids=b["input_ids"]).logits[0, :-1]
            labels = b["labels"][0, 1:]
            nll = nll + torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            count += int((labels != -100).sum())
        (nll / count).backward()
        grads[key] = {n: pool[n].grad.clone() for n in pool}
    model.zero_grad()
    mean = {n: sum(grads[k][n] * sizes[k] / total for k in GROUPS) for n in pool}
    votes = {
        n: sum(torch.sign(grads[k][n] * (pool[n].detach() - aligned[n])) for k in GROUPS)
        for n in pool
    }
    smallest = {n: torch.stack([grads[k][n].abs() for k in GROUPS]).amin(0) for n in pool}
    return mean, votes, smallest


@pytest.mark.parametrize("with_norm", [False, True])
def test_batched_agreement_equals_one_pass_per_request(models, with_norm):
    model, aligned_model, tok = models
    params = dict(model.named_parameters())
    names = [n for n in params if ".layers." in n and "norm" not in n]
    if with_norm:
        # A parameter outside the linear layers: every request then has its own pass.
        names.append("model.layers.1.post_attention_layernorm.weight")
    assert any(n.endswith(".bias") for n in names)
    for p in model.parameters():
        p.requires_grad_(False)
    pool = {n: params[n] for n in names}
    for p in pool.values():
        p.requires_grad_(True)
    ref = dict(aligned_model.named_parameters())
    aligned = {n: ref[n].detach() for n in pool}
    mean, votes, smallest = per_request(model, tok, pool, aligned)
    got = agreed_grads(model, tok, GROUPS, pool, aligned, batch_size=3)
    scale = max(float(m.abs().max()) for m in mean.values())
    n_groups = len(GROUPS)
    for n in pool:
        factor = torch.clamp(votes[n] / n_groups, min=0)
        assert torch.allclose(got[n], mean[n] * factor, rtol=1e-4, atol=1e-6 * scale), n
        # Away from ties (every request's gradient clear of zero), the votes are exact.
        clear = (smallest[n] > 1e-4 * scale) & (mean[n].abs() > 1e-4 * scale)
        assert int(clear.sum()) > 0
        got_votes = torch.round(got[n][clear] / mean[n][clear] * n_groups)
        assert torch.equal(got_votes, torch.clamp(votes[n][clear], min=0)), n
        assert pool[n].requires_grad and pool[n].grad is None


@pytest.mark.parametrize("positive", [3_000_000, 5_000, 700])
def test_largest_positive_scores_are_topks(positive):
    # More than 2^20 scores, so the threshold comes from a strided sample; with few
    # positive scores it lets fewer than k through and every positive one is ranked.
    gen = torch.Generator().manual_seed(0)
    flat = -torch.rand(3_000_000, generator=gen)
    flat[torch.randperm(len(flat), generator=gen)[:positive]] *= -1
    k = 1_000
    got = _largest_positive(flat, k)
    take = min(k, positive)
    assert set(got.tolist()) == set(torch.topk(flat, take).indices.tolist())
