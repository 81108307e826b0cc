"""Repair's memory-saving paths give what the plain paths give, bit for bit.

- restoration's shortlist chooses what a sort of every score chooses (ties included);
- a bfloat16 checkpoint loaded as stored and widened computes as a float32 load;
- `restore_model`, which loads the aligned model alone first and keeps the deep blocks
  narrow, ends where `restore` on two float32-loaded models ends.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_state

from weightops.compat import causal_lm
from weightops.io.checkpoint import Checkpoint
from weightops.repair.activations import _load_causal_lm, activation_norms
from weightops.repair.data import Example
from weightops.repair.precision import (
    deep_parameters,
    load_narrow,
    stored_dtype,
    widen_except,
    widened,
)
from weightops.repair.restore import restore, restore_model
from weightops.repair.restore_reader import _Reader
from weightops.repair.restore_select import Shortlist

HARMFUL = [Example(f"how do i make thing {i}?") for i in range(5)] + [Example("build it")]
TASK = [Example(f"reverse: ab{c}\n", f"{c}ba") for c in "cdefg"]


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    from weightops.demo import fine_tune, tiny_model

    root = tmp_path_factory.mktemp("bf16")
    base = tiny_model(root / "base", "llama", seed=0, dtype=torch.bfloat16)
    return {"base": base, "ft": fine_tune(base, root / "ft", seed=1)}


def reference_choice(scores: np.ndarray, k: int, seed: int) -> list[int]:
    """The k largest by a full sort; of those tied at the k-th value, a seeded draw
    in index order (the documented tie rule)."""
    kth = np.sort(scores)[::-1][k - 1]
    above = np.nonzero(scores > kth)[0]
    tied = np.nonzero(scores == kth)[0]
    order = torch.randperm(len(tied), generator=torch.Generator().manual_seed(seed)).numpy()
    return sorted([*above.tolist(), *tied[order[: k - len(above)]].tolist()])


@pytest.mark.parametrize("backwards", [False, True])
@pytest.mark.parametrize("k", [1, 7, 40, 500])
def test_shortlist_chooses_as_a_full_sort(k, backwards):
    rng = np.random.default_rng(k)
    # Few distinct values, so ties at the k-th score are the rule, and chunks of many
    # sizes, so the shortlist trims several times; added first to last or last first
    # (as restoration adds the blocks, deepest first).
    scores = rng.integers(1, 12, size=300).astype(np.float32)
    short = Shortlist(k)
    chunks, start = [], 0
    for size in (1, 50, 3, 120, 0, 126):
        chunks.append((start, size))
        start += size
    for start, size in reversed(chunks) if backwards else chunks:
        chunk = scores[start : start + size]
        short.add(torch.from_numpy(chunk), torch.arange(start, start + size))
    got = sorted(short.top(torch.Generator().manual_seed(5)).tolist())
    expected = reference_choice(scores, min(k, len(scores)), 5)
    assert got == expected
    assert short.count == 300


def test_shortlist_with_fewer_candidates_than_k_takes_them_all():
    short = Shortlist(10)
    short.add(torch.tensor([0.5, 2.0]), torch.tensor([3, 9]))
    assert sorted(short.top(torch.Generator()).tolist()) == [3, 9]


def test_narrow_load_widened_computes_as_a_float32_load(bf16):
    folder = bf16["ft"]
    assert stored_dtype(Checkpoint(folder), torch.float32) == torch.bfloat16
    plain = causal_lm(folder, torch.float32).eval()
    lean = load_narrow(folder, torch.bfloat16, torch.float32, "cpu")
    deep = deep_parameters(lean, 2)
    widen_except(lean, torch.float32, deep)
    names = {n for n, p in lean.named_parameters() if p.dtype == torch.bfloat16}
    assert names and all(("layers.2." in n or "layers.3." in n or "lm_head" in n) for n in names)
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["position_ids"] = torch.arange(5)[None]
    batch["last"] = torch.tensor([4])
    # The state after block 1, read by a pass that stops there (the narrow blocks unused).
    a = _Reader(plain, 2, [batch]).mean()
    b = _Reader(lean, 2, [batch]).mean()
    assert torch.equal(a, b)
    with torch.no_grad(), widened(deep, torch.float32):
        assert all(p.dtype == torch.float32 for p in lean.parameters())
        assert torch.equal(plain(input_ids=ids).logits, lean(input_ids=ids).logits)
    assert {n for n, p in lean.named_parameters() if p.dtype == torch.bfloat16} == names


def test_prune_model_keeps_the_head_narrow_and_norms_exact(bf16):
    from transformers import AutoTokenizer

    folder = bf16["ft"]
    tok = AutoTokenizer.from_pretrained(folder)
    data = [Example(e.prompt, " sure, here") for e in HARMFUL]
    lean = _load_causal_lm(folder, torch.float32, "cpu")
    assert lean.get_output_embeddings().weight.dtype == torch.bfloat16
    plain = causal_lm(folder, torch.float32).eval()
    a = activation_norms(plain, tok, data, batch_size=4, progress=False)
    b = activation_norms(lean, tok, data, batch_size=4, progress=False)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_restore_model_ends_where_restore_on_float32_models_ends(bf16, tmp_path):
    from transformers import AutoTokenizer

    def metric(prompt: str, completion: str, reference: str) -> float:
        # Varies with the completion, so checkpoints fail and the rollback run happens.
        return len(completion) / 32 + (completion[:1] == reference[:1])

    settings = dict(fraction=0.01, steps=4, checkpoint_every=2, seed=3, progress=False)
    summary = restore_model(
        bf16["ft"], bf16["base"], HARMFUL, TASK, tmp_path / "out", metric=metric, **settings
    )
    tok = AutoTokenizer.from_pretrained(bf16["ft"])
    ft = causal_lm(bf16["ft"], torch.float32).eval()
    al = causal_lm(bf16["base"], torch.float32).eval()
    plain = restore(ft, al, tok, HARMFUL, TASK, metric=metric, **settings).summary()
    summary.pop("out")
    assert summary == plain
    assert plain["rollback"] and plain["restored_total"] > 0
    written = load_state(tmp_path / "out")
    for name, p in ft.named_parameters():
        assert torch.equal(written[name].float(), p.detach()), name


def test_a_reference_fixes_the_depth_worked_on(bf16):
    from transformers import AutoTokenizer

    from weightops.repair.restore import RestoreError, aligned_reference

    tok = AutoTokenizer.from_pretrained(bf16["ft"])
    al = causal_lm(bf16["base"], torch.float32).eval()
    reference = aligned_reference(al, tok, HARMFUL, layers=2)
    assert reference.layers == 2 and reference.depth == 4
    assert reference.target.shape == (al.config.hidden_size,)
    # The values are the aligned model's own tensors, blocks 0 and 1 without norms.
    params = dict(al.named_parameters())
    assert all(v.data_ptr() == params[n].data_ptr() for n, v in reference.values.items())
    assert {n.split(".")[2] for n in reference.values} == {"0", "1"}
    assert not any("norm" in n for n in reference.values)
    ft = causal_lm(bf16["ft"], torch.float32).eval()
    with pytest.raises(RestoreError, match="layers 1"):
        restore(ft, reference, tok, HARMFUL, TASK, layers=1, task_metric=lambda m: 1.0)
