"""Restoration's lean gradient pass and lean model give what the plain ones give, bit
for bit.

- The gradient of −cos(mean state at layer L, target), taken one block at a time (and
  handed over block by block, one block's gradients alive at a time), is the gradient
  a whole-graph backward pass per batch gives, written out here with plain autograd;
  a model whose blocks do not chain falls back to that pass.
- The aligned values read from the checkpoint are the loaded model's.
- A bfloat16 model whose embedding stays narrow computes as a float32 load, tied
  output head included.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_state
from test_repair_memory import HARMFUL, TASK

from weightops.compat import causal_lm
from weightops.io.checkpoint import Checkpoint
from weightops.repair.data import batches
from weightops.repair.precision import (
    deep_parameters,
    load_narrow,
    narrow_embedding,
    widen_except,
    widened,
)
from weightops.repair.restore import restore, restore_model
from weightops.repair.restore_reader import _Reader
from weightops.repair.restore_steps import _pool
from weightops.repair.restore_values import StoredValues
from weightops.steering.layers import find_layers

LAYERS = 2


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    """Two bfloat16 families: llama (untied head) and qwen2 (head tied to the embedding)."""
    from weightops.demo import fine_tune, tiny_model

    out = {}
    for family in ("llama", "qwen2"):
        root = tmp_path_factory.mktemp(family)
        base = tiny_model(root / "base", family, seed=0, dtype=torch.bfloat16)
        out[family] = {"base": base, "ft": fine_tune(base, root / "ft", seed=1)}
    return out


def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def whole_graph_grads(model, batch_list, target, layers):
    """∇(−cos(mean state after `layers` blocks at the last prompt token, target)) by
    plain autograd: the mean without gradients, the gradient of −cos at the mean, then
    one backward pass per batch through the whole forward graph."""
    params = dict(model.named_parameters())
    names = [n for n in params if any(f"layers.{i}." in n for i in range(layers))]
    names = [n for n in names if "norm" not in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)

    def states(b):
        out = model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            position_ids=b["position_ids"],
            use_cache=False,
            output_hidden_states=True,
        )
        h = out.hidden_states[layers]
        return h[torch.arange(len(b["last"])), b["last"]].float()

    count = sum(len(b["last"]) for b in batch_list)
    with torch.no_grad():
        mean = sum(states(b).sum(0) for b in batch_list) / count
    m = mean.double().requires_grad_(True)
    loss = -torch.nn.functional.cosine_similarity(m, target.double(), dim=0)
    (up,) = torch.autograd.grad(loss, m)
    for b in batch_list:
        (states(b).sum(0) @ up.float() / count).backward()
    grads = {n: params[n].grad.clone() for n in names}
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    return grads


def block_order(model, layers):
    """The order in which blocks 0 … layers − 1 run with gradients enabled."""
    order: list[int] = []
    for i, block in enumerate(find_layers(model).blocks[:layers]):
        block.register_forward_hook(
            lambda m, a, o, i=i: order.append(i) if torch.is_grad_enabled() else None
        )
    return order


def reader_grads(model, batch_list, target, layers):
    """The gradients `_Reader` hands over, block by block, and for each hand-over the
    blocks that held gradients at that moment."""
    pool = _pool(model, layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in pool.values():
        p.requires_grad_(True)
    grads, alive = {}, []

    def on_block(i):
        alive.append(sorted({int(n.split(".")[2]) for n, p in pool.items() if p.grad is not None}))
        for n, p in pool.items():
            if f"layers.{i}." in n:
                grads[n] = p.grad.clone()
                p.grad = None

    _Reader(model, layers, batch_list).backward_cos(target, on_block)
    for p in pool.values():
        p.requires_grad_(False)
    return grads, alive


def _prepared(families, family):
    folder = families[family]["ft"]
    model = causal_lm(folder, torch.float32).eval()
    batch_list = list(batches(HARMFUL, tokenizer(folder), batch_size=4, with_response=False))
    target = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return model, batch_list, target


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_blockwise_gradients_are_the_whole_graph_gradients(bf16, family):
    model, batch_list, target = _prepared(bf16, family)
    expected = whole_graph_grads(model, batch_list, target, LAYERS)
    order = block_order(model, LAYERS)
    got, alive = reader_grads(model, batch_list, target, LAYERS)
    # One block at a time, last first, through every batch; only its gradients alive.
    assert order == [1] * len(batch_list) + [0] * len(batch_list)
    assert alive == [[1], [0]]
    assert got.keys() == expected.keys()
    for n in expected:
        assert torch.equal(got[n], expected[n]), n


def test_blocks_that_do_not_chain_take_the_whole_graph_pass(bf16):
    model, batch_list, target = _prepared(bf16, "llama")

    def detour(module, args):
        # Block 1 is given a copy of block 0's output: equal values, another tensor.
        return (args[0] * 1.0, *args[1:])

    find_layers(model).blocks[1].register_forward_pre_hook(detour)
    expected = whole_graph_grads(model, batch_list, target, LAYERS)
    order = block_order(model, LAYERS)
    got, alive = reader_grads(model, batch_list, target, LAYERS)
    assert order == [0, 1] * len(batch_list)
    assert alive == [[0, 1], [0]]
    for n in expected:
        assert torch.equal(got[n], expected[n]), n


def test_stored_values_read_what_the_model_loaded(bf16):
    folder = bf16["llama"]["base"]
    model = load_narrow(folder, torch.bfloat16, torch.float32, "cpu")
    loaded = {n: p.detach() for n, p in _pool(model, LAYERS).items()}
    changed = dict(loaded)
    name = next(iter(loaded))
    changed[name] = loaded[name] + 1  # as if converted on load: not the stored value
    changed["extra.weight"] = torch.ones(3, dtype=torch.bfloat16)  # not in the checkpoint
    stored = load_state(folder)
    with StoredValues(Checkpoint(folder), changed) as values:
        assert sorted(values.held) == sorted([name, "extra.weight"])
        assert set(values) == set(changed)
        for n, v in changed.items():
            got = values[n]
            assert got.dtype == v.dtype and torch.equal(got, v), n
            if n in loaded and n != name:
                assert torch.equal(got, stored[n]), n
        other = next(n for n in loaded if n != name)
        values[other].zero_()  # a read is a fresh tensor: the next one is unchanged
        assert torch.equal(values[other], stored[other])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_narrow_embedding_computes_as_a_float32_load(bf16, family):
    folder = bf16[family]["ft"]
    plain = causal_lm(folder, torch.float32).eval()
    lean = load_narrow(folder, torch.bfloat16, torch.float32, "cpu")
    deep = deep_parameters(lean, LAYERS)
    embed = narrow_embedding(lean, torch.float32)
    widen_except(lean, torch.float32, deep + embed)
    assert lean.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["position_ids"] = torch.arange(5)[None]
    batch["last"] = torch.tensor([4])
    assert torch.equal(
        _Reader(plain, LAYERS, [batch]).mean(), _Reader(lean, LAYERS, [batch]).mean()
    )
    head = lean.get_output_embeddings().weight
    tied = [w for w in embed if w is head]
    assert bool(tied) == (family == "qwen2")
    with torch.no_grad(), widened(deep + tied, torch.float32):
        assert torch.equal(plain(input_ids=ids).logits, lean(input_ids=ids).logits)


@pytest.mark.slow  # ~30 s: two whole restorations
def test_restore_model_with_a_tied_head_ends_where_restore_on_float32_models_ends(bf16, tmp_path):
    folders = bf16["qwen2"]

    def metric(prompt: str, completion: str, reference: str) -> float:
        # Varies with the completion, so checkpoints fail and the rollback run happens.
        return len(completion) / 32 + (completion[:1] == reference[:1])

    settings = dict(fraction=0.01, steps=4, checkpoint_every=2, seed=3, progress=False)
    summary = restore_model(
        folders["ft"], folders["base"], HARMFUL, TASK, tmp_path / "out", metric=metric, **settings
    )
    tok = tokenizer(folders["ft"])
    ft = causal_lm(folders["ft"], torch.float32).eval()
    al = causal_lm(folders["base"], torch.float32).eval()
    plain = restore(ft, al, tok, HARMFUL, TASK, metric=metric, **settings).summary()
    summary.pop("out")
    assert summary == plain
    assert plain["restored_total"] > 0
    written = load_state(tmp_path / "out")
    for name, p in ft.named_parameters():
        assert torch.equal(written[name].float(), p.detach()), name
