"""Permutation matching: `weightops align`, the recipe `align:` key, and the matcher.

Permuted models are made here by a routine that knows each family's layout by name
and never calls weightops, so that a permutation the product gets wrong cannot be
mirrored by the same mistake in the test.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_state, write_recipe
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from weightops.align import align_model
from weightops.cli import app
from weightops.demo import tiny_model
from weightops.engine.plan import build_plan
from weightops.engine.run import RunOptions, execute
from weightops.errors import WeightopsError
from weightops.recipe import load_recipe

FAMILIES = ["llama", "qwen2", "gemma", "gpt2"]


@pytest.fixture(autouse=True)
def _one_thread():
    # The score matrices here are tiny; intra-op threads only contend for the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(args: list[object]):
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------- the independent permuter


def _perm(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g)


def _heads_perm(n_q: int, n_kv: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random reordering of query heads that keeps each key/value group together
    (query head j uses key/value head j // (n_q / n_kv) in transformers), and the
    matching key/value head order."""
    rep = n_q // n_kv
    kv = _perm(n_kv, g)
    q = torch.cat([kv[a] * rep + _perm(rep, g) for a in range(n_kv)])
    return q, kv


def _rows_by_head(t: torch.Tensor, order: torch.Tensor, dim: int, parts: int = 1) -> torch.Tensor:
    """Reorder the heads along `dim`, which holds `parts` consecutive blocks of heads."""
    n = order.numel()
    shape = list(t.shape)
    view = t.reshape(*shape[:dim], parts, n, shape[dim] // (parts * n), *shape[dim + 1 :])
    return view.index_select(dim + 1, order).reshape(shape)


def permute_state(
    state: dict[str, torch.Tensor],
    config: dict,
    seed: int,
    kinds: tuple[str, ...] = ("residual", "mlp", "heads"),
) -> dict[str, torch.Tensor]:
    """The same network with random orders of the residual features, each layer's MLP
    units and each layer's heads (only the kinds asked for)."""
    g = torch.Generator().manual_seed(seed)
    gpt2 = config["model_type"] == "gpt2"
    hidden = config["n_embd"] if gpt2 else config["hidden_size"]
    n_q = config["n_head"] if gpt2 else config["num_attention_heads"]
    n_kv = n_q if gpt2 else config["num_key_value_heads"]
    layers = config["n_layer"] if gpt2 else config["num_hidden_layers"]
    ident = torch.arange
    res = _perm(hidden, g) if "residual" in kinds else ident(hidden)
    heads, mlp = [], []
    for _ in range(layers):
        heads.append(_heads_perm(n_q, n_kv, g) if "heads" in kinds else (ident(n_q), ident(n_kv)))
        width = 4 * hidden if gpt2 else config["intermediate_size"]
        mlp.append(_perm(width, g) if "mlp" in kinds else ident(width))

    out = {}
    for name, t in state.items():
        parts = name.split(".")
        layer = (
            int(parts[parts.index("h" if gpt2 else "layers") + 1])
            if ".h." in name or ".layers." in name
            else None
        )
        q, kv = heads[layer] if layer is not None else (None, None)
        m = mlp[layer] if layer is not None else None
        bias = name.endswith(".bias")
        if gpt2:
            if name.endswith(("wte.weight", "wpe.weight")):
                t = t[:, res]
            elif ".ln_" in name:
                t = t[res]
            elif "attn.c_attn" in name:  # Conv1D (in, out); out = [q | k | v]
                t = _rows_by_head(t, q, 0, 3) if bias else _rows_by_head(t[res], q, 1, 3)
            elif "attn.c_proj" in name:
                t = t[res] if bias else _rows_by_head(t, q, 0)[:, res]
            elif "mlp.c_fc" in name:
                t = t[m] if bias else t[res][:, m]
            elif "mlp.c_proj" in name:
                t = t[res] if bias else t[m][:, res]
            else:
                raise AssertionError(name)
        else:
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                t = t[:, res]
            elif "norm" in name:
                t = t[res]
            elif "q_proj" in name:
                t = _rows_by_head(t, q, 0) if bias else _rows_by_head(t, q, 0)[:, res]
            elif "k_proj" in name or "v_proj" in name:
                t = _rows_by_head(t, kv, 0) if bias else _rows_by_head(t, kv, 0)[:, res]
            elif "o_proj" in name:
                t = _rows_by_head(t[res], q, 1)
            elif "gate_proj" in name or "up_proj" in name:
                t = t[m][:, res]
            elif "down_proj" in name:
                t = t[res][:, m]
            else:
                raise AssertionError(name)
        out[name] = t.contiguous()
    return out


def save_like(source: Path, state: dict[str, torch.Tensor], folder: Path) -> Path:
    """`source`'s folder (config, tokenizer) with other weights."""
    shutil.copytree(source, folder)
    for f in [*folder.glob("*.safetensors"), *folder.glob("*.index.json")]:
        f.unlink()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def config_of(folder: Path) -> dict:
    return AutoConfig.from_pretrained(folder).to_dict()


IDS = torch.tensor([[5, 80, 33, 200, 17, 9, 111, 64]])


def logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(IDS).logits


def permuted_copy(families, family: str, root: Path, seed: int = 11, **kw) -> Path:
    base = families[family]["base"]
    state = permute_state(load_state(base), config_of(base), seed, **kw)
    return save_like(base, state, root / f"{family}-permuted")


# ------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", FAMILIES)
def test_random_permutation_is_undone_exactly(families, family, tmp_path):
    base = families[family]["base"]
    permuted = permuted_copy(families, family, tmp_path)
    original, shuffled = load_state(base), load_state(permuted)
    # The permutation is a real one (every kind moved) and keeps the function.
    assert all(
        not torch.equal(original[n], shuffled[n]) for n in original if "norm" in n or "ln_" in n
    )
    torch.testing.assert_close(logits(permuted), logits(base), rtol=0, atol=1e-5)

    result = align_model(permuted, base, tmp_path / "aligned")
    aligned = load_state(tmp_path / "aligned")
    assert aligned.keys() == original.keys()
    for name in original:
        assert torch.equal(aligned[name], original[name]), name
    assert result.converged
    # Back in the same basis, ⟨A, π(B)⟩ reaches ‖A‖², the largest value it can take.
    assert result.objective_after == pytest.approx(result.reference_sq, rel=1e-6)
    assert result.objective_before < 0.9 * result.reference_sq


@pytest.mark.parametrize("family", FAMILIES)
def test_aligned_model_computes_the_same_function(family, tmp_path):
    # Two independent random models: the permutations found are far from the identity.
    ref = tiny_model(tmp_path / "ref", family, seed=0, layers=2)
    other = tiny_model(tmp_path / "other", family, seed=7, layers=2)
    result = align_model(other, ref, tmp_path / "aligned")
    assert sum(moved > 0 for moved in result.moved.values()) >= 3
    assert result.objective_after > result.objective_before
    torch.testing.assert_close(logits(tmp_path / "aligned"), logits(other), rtol=0, atol=1e-5)
    card = (tmp_path / "aligned" / "README.md").read_text()
    assert str(ref) in card and "seed: 0" in card and "before" in card


def test_objective_never_decreases_and_is_what_it_says(tmp_path):
    ref = tiny_model(tmp_path / "ref", "qwen2", seed=0, layers=2)
    other = tiny_model(tmp_path / "other", "qwen2", seed=3, layers=2)
    result = align_model(other, ref, tmp_path / "aligned", seed=5)
    steps = result.history
    assert len(steps) == result.rounds + 1 and result.rounds >= 2
    assert all(b >= a for a, b in itertools.pairwise(steps)), steps
    # Recomputed here from the files: Σ over tensors of ⟨W_ref, W_aligned⟩.
    a, b = load_state(ref), load_state(tmp_path / "aligned")
    direct = sum(float((a[n].double() * b[n].double()).sum()) for n in a)
    assert result.objective_after == pytest.approx(direct, rel=1e-6)
    assert steps[-1] == pytest.approx(direct, rel=1e-5)
    before = sum(float((a[n].double() * load_state(other)[n].double()).sum()) for n in a)
    assert result.objective_before == pytest.approx(before, rel=1e-6)


def test_groups_switched_off_stay_identity(families, tmp_path):
    base = families["llama"]["base"]
    # Only MLP units moved: matching MLP groups alone undoes it exactly.
    only_mlp = permuted_copy(families, "llama", tmp_path / "a", kinds=("mlp",))
    r = invoke(
        [
            "align",
            only_mlp,
            "--to",
            base,
            "-o",
            tmp_path / "mlp",
            "--groups",
            "mlp",
            "--no-progress",
        ]
    )
    assert r.exit_code == 0, r.output
    original = load_state(base)
    got = load_state(tmp_path / "mlp")
    assert all(torch.equal(got[n], original[n]) for n in original)

    # Everything moved, but only heads matched: residual and MLP orders are left alone.
    everything = permuted_copy(families, "llama", tmp_path / "b")
    r = invoke(["align", everything, "--to", base, "-o", tmp_path / "heads", "--groups", "heads"])
    assert r.exit_code == 0, r.output
    before, after = load_state(everything), load_state(tmp_path / "heads")
    for name in before:
        if "self_attn" in name:
            continue
        assert torch.equal(after[name], before[name]), name
    assert any(not torch.equal(after[n], before[n]) for n in before if "q_proj" in n), (
        "the heads were not matched"
    )


def test_recipe_align_merges_a_permuted_copy_like_the_original(families, tmp_path):
    fam = families["qwen2"]
    shuffled = save_like(
        fam["ft_b"],
        permute_state(load_state(fam["ft_b"]), config_of(fam["ft_b"]), seed=4),
        tmp_path / "ft_b_shuffled",
    )

    def linear(b: Path, align: str, tag: str) -> dict[str, torch.Tensor]:
        recipe = write_recipe(
            tmp_path / f"{tag}.yaml",
            f"merge_method: linear\nmodels:\n  - model: {fam['ft_a']}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.4}}\n{align}",
        )
        out = tmp_path / f"merged-{tag}"
        # Small row blocks: column-permuted inputs are read in pieces, row-permuted whole.
        options = RunOptions(progress=False, chunk_elements=512)
        execute(build_plan(load_recipe(recipe), recipe.parent), out, options)
        return load_state(out)

    want = linear(fam["ft_b"], "", "original")
    got = linear(shuffled, f"align:\n  to: {fam['ft_a']}\n", "aligned")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7)
    # Without alignment the permuted copy merges into something else.
    naive = linear(shuffled, "", "naive")
    assert not torch.allclose(naive["model.embed_tokens.weight"], want["model.embed_tokens.weight"])
    card = (tmp_path / "merged-aligned" / "README.md").read_text()
    assert "permuted to match" in card


def test_recipe_align_key_is_validated(llama, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {llama['ft_a']}\n  - model: {llama['ft_b']}\n"
        "parameters: {weight: 1.0}\nalign:\n  to: no/such/model\n  groups: [mlp, neurons]\n"
        "  sed: 3\n",
    )
    r = invoke(["validate", recipe])
    assert r.exit_code == 1
    for needle in ("align.groups", "align.sed", "unknown key"):
        assert needle in r.output, r.output
    recipe.write_text(recipe.read_text().split("align:")[0] + "align: {to: no/such/model}\n")
    r = invoke(["validate", recipe])
    assert r.exit_code == 1
    assert "align.to" in r.output and "not found" in r.output, r.output


def test_recipe_align_to_another_architecture_fails_before_work(families, tmp_path):
    llama = families["llama"]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {llama['ft_a']}\n  - model: {llama['ft_b']}\n"
        f"parameters: {{weight: 1.0}}\nalign:\n  to: {families['gpt2']['base']}\n",
    )
    r = invoke(["merge", recipe, "-o", tmp_path / "out"])
    assert r.exit_code == 1
    assert "llama" in r.stderr and "gpt2" in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_bad_input(families, tmp_path):
    llama = families["llama"]["base"]

    def fails(args: list[object], *needles: str) -> None:
        r = invoke(["align", *args])
        assert r.exit_code != 0, r.output
        assert r.stderr.startswith("error: ") and "Traceback" not in r.output, r.output
        for n in needles:
            assert n in r.stderr, r.stderr

    out = tmp_path / "out"
    fails([llama, "--to", families["gpt2"]["base"], "-o", out], "llama", "gpt2")
    deeper = tiny_model(tmp_path / "deeper", "llama", layers=5)
    fails([deeper, "--to", llama, "-o", out], "model.layers.4.", "missing")
    wider = tmp_path / "wider"
    tiny_model(wider, "llama", layers=4)
    state = load_state(wider)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(96, 64)
    save_like(wider, state, tmp_path / "wider2")
    fails([tmp_path / "wider2", "--to", llama, "-o", out], "up_proj", "[96, 64]")
    fails([tmp_path / "nothing", "--to", llama, "-o", out], "nothing", "no such")
    fails([llama, "--to", tmp_path / "nothing", "-o", out], "no such")
    fails([llama, "--to", llama, "-o", out, "--groups", "mlp,neurons"], "neurons", "residual")
    fails([llama, "--to", llama, "-o", llama], "own folder")
    out.mkdir()
    (out / "keep.txt").write_text("x")
    fails([llama, "--to", llama, "-o", out], "not empty", "--force")
    assert (out / "keep.txt").exists()
    assert list(tmp_path.glob(".*weightops-tmp*")) == []


def test_unsupported_tensor_is_refused(families, tmp_path):
    base = families["llama"]["base"]
    state = load_state(base)
    state["model.layers.0.mlp.router.weight"] = torch.zeros(4, 64)
    odd = save_like(base, state, tmp_path / "odd")
    with pytest.raises(WeightopsError, match="router"):
        align_model(odd, odd, tmp_path / "out")
