"""Vocabulary merging: the merged tokenizer and the embeddings re-indexed to it.

Tiny Llama checkpoints with different tokenizers (the configurations of mergekit's
tokenizer tests, and character-level ones with added tokens). Every expected row is
computed here from the inputs' tensors, looked up by token string in each input's own
tokenizer, with the defaults written out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state
from typer.testing import CliRunner

from weightops.cli import app
from weightops.compat import causal_lm, causal_lm_from_config
from weightops.engine.plan import build_plan
from weightops.engine.run import RunOptions, execute
from weightops.errors import MergeError, RecipeError
from weightops.recipe import parse_recipe

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
CHAT = ["<|im_start|>", "<|im_end|>"]
UNUSED = [f"<UNUSED_{i}>" for i in range(4)]


# --------------------------------------------------------------------------- models


def bpe_tokenizer(n: int, added: list[str]):
    """mergekit's test tokenizer: <unk> <s> </s> _tok_3 … _tok_{n-1}, plus `added`."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, n)]
    spec = {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []}
    tok = tokenizers.Tokenizer.from_str(json.dumps({"version": "1.0", "model": spec}))
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    out.add_tokens(added)
    return out


def char_tokenizer(added: list[str]):
    """One token per character of the first 128 code points, plus `added`."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(128)} | {"<unk>": 128, "<eos>": 129}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    out.add_tokens(added)
    return out


def tiny_llama(folder: Path, rows: int, tokenizer, *, seed: int, tied: bool = False) -> Path:
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "llama",
        vocab_size=rows,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = causal_lm_from_config(config, torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mk(tmp_path_factory) -> dict[str, Path]:
    """mergekit's three test models: base (64 rows, 64 tokens), chatml (66 rows, two
    added chat tokens) and padded (64 rows, four added tokens beyond its rows)."""
    root = tmp_path_factory.mktemp("mk")
    return {
        "base": tiny_llama(root / "base", 64, bpe_tokenizer(64, []), seed=1),
        "chatml": tiny_llama(root / "chatml", 66, bpe_tokenizer(64, CHAT), seed=2),
        "padded": tiny_llama(root / "padded", 64, bpe_tokenizer(64, UNUSED), seed=3),
    }


@pytest.fixture(scope="module")
def chars(tmp_path_factory) -> dict[str, Path]:
    """Character-level models with different added tokens: a (130 rows, nothing added),
    b (+ chat tokens, 132 rows), c (+ <tool> and <|im_end|>, 140 rows: padded)."""
    root = tmp_path_factory.mktemp("chars")
    return {
        "a": tiny_llama(root / "a", 130, char_tokenizer([]), seed=4),
        "b": tiny_llama(root / "b", 132, char_tokenizer(CHAT), seed=5),
        "c": tiny_llama(root / "c", 140, char_tokenizer(["<tool>", "<|im_end|>"]), seed=6),
        "tied": tiny_llama(root / "tied", 131, char_tokenizer(["<tool>"]), seed=7, tied=True),
    }


class Rows:
    """A checkpoint's tensors and its tokenizer's vocabulary, for lookups by token."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.state = load_state(folder)
        self.vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
        self.rows = self.state[EMBED].shape[0]

    def row(self, token: str, name: str = EMBED) -> torch.Tensor | None:
        i = self.vocab.get(token)
        tensor = self.state.get(name, self.state[EMBED])  # a tied lm_head is the embedding
        return None if i is None or i >= self.rows else tensor[i]


def merge(recipe: dict, out: Path, **options) -> Path:
    options = {"device": "cpu", "progress": False, **options}
    plan = build_plan(parse_recipe(yaml.safe_dump(json.loads(json.dumps(recipe, default=str)))))
    return execute(plan, out, RunOptions(**options))


def recipe(models: list[Path], base: Path | None = None, method: str = "linear", **extra) -> dict:
    """mergekit's test recipe: every model at weight 1, float32."""
    data: dict = {
        "merge_method": method,
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        "dtype": "float32",
    }
    if base is not None:
        data["base_model"] = str(base)
    data.update(extra)
    return data


def output_tokenizer(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


def default_row(token: str, inputs: list[Rows], base: Rows | None, name: str) -> torch.Tensor:
    """mergekit's default for a token some input lacks, written out."""
    have = [r.row(token, name) for r in inputs if r.row(token, name) is not None]
    if len(have) == 1:
        return have[0]
    if not have:
        return torch.zeros_like(inputs[0].state[EMBED][0])
    if base is not None and base.row(token, name) is not None:
        return base.row(token, name)
    return torch.stack(have).mean(0)


def aligned(token: str, rows: Rows, inputs: list[Rows], base: Rows | None, name: str):
    own = rows.row(token, name)
    return own if own is not None else default_row(token, inputs, base, name)


# ----------------------------------------------------- mergekit's tokenizer tests


def test_legacy_mode(mk, tmp_path):
    """No tokenizer settings: the base's tokenizer is copied and the inputs' first 64
    rows (the rows all of them have) are averaged."""
    models = [mk["base"], mk["padded"], mk["chatml"]]
    out = merge(recipe(models, mk["base"]), tmp_path / "out")
    tok = output_tokenizer(out)
    assert len(tok.get_vocab()) == 64 and len(tok.added_tokens_decoder) == 3
    state = load_state(out)
    for name in (EMBED, HEAD):
        expect = torch.stack([load_state(m)[name][:64] for m in models]).mean(0)
        torch.testing.assert_close(state[name], expect)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64


def test_source_base(mk, tmp_path):
    models = [mk["base"], mk["padded"], mk["chatml"]]
    out = merge(recipe(models, mk["base"], tokenizer_source="base"), tmp_path / "out")
    tok = output_tokenizer(out)
    assert len(tok.get_vocab()) == 64 and len(tok.added_tokens_decoder) == 3
    inputs = [Rows(m) for m in models]
    state = load_state(out)
    for token, i in tok.get_vocab().items():
        expect = torch.stack([r.row(token) for r in inputs]).mean(0)
        torch.testing.assert_close(state[EMBED][i], expect)


def check_union_rows(out: Path, models: list[Path], base: Path | None, combine) -> None:
    """Every output row of both vocabulary tensors is `combine` of the inputs' aligned
    rows for the same token."""
    inputs = [Rows(m) for m in models]
    base_rows = Rows(base) if base is not None else None
    state = load_state(out)
    vocab = output_tokenizer(out).get_vocab()
    for name in [n for n in (EMBED, HEAD) if n in state]:  # a tied output has no lm_head
        for token, i in vocab.items():
            rows = [aligned(token, r, inputs, base_rows, name) for r in inputs]
            b = aligned(token, base_rows, inputs, base_rows, name) if base_rows else None
            torch.testing.assert_close(state[name][i], combine(rows, b), msg=f"{name} {token}")


def test_source_union(mk, tmp_path):
    models = [mk["base"], mk["padded"], mk["chatml"]]
    out = merge(recipe(models, mk["base"], tokenizer_source="union"), tmp_path / "out")
    tok = output_tokenizer(out)
    vocab = tok.get_vocab()
    assert len(vocab) == 66 and len(tok.added_tokens_decoder) == 5
    assert [vocab[t] for t in CHAT] == [64, 65]  # appended after the base's 64
    assert not set(UNUSED) & set(vocab)  # padded's added tokens have no embedding rows
    chatml, state = Rows(mk["chatml"]), load_state(out)
    for t in CHAT:  # only chatml has them: every input takes its row
        torch.testing.assert_close(state[EMBED][vocab[t]], chatml.row(t))
    check_union_rows(out, models, mk["base"], lambda rows, b: torch.stack(rows).mean(0))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 66


def test_source_model(mk, tmp_path):
    models = [mk["base"], mk["padded"], mk["chatml"]]
    out = merge(recipe(models, mk["base"], tokenizer_source=str(mk["chatml"])), tmp_path / "out")
    vocab = output_tokenizer(out).get_vocab()
    assert len(vocab) == 66 and set(CHAT) <= set(vocab)
    check_union_rows(out, models, mk["base"], lambda rows, b: torch.stack(rows).mean(0))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the two flattened rows, linear when nearly parallel."""
    na, nb = a / a.norm(), b / b.norm()
    dot = torch.clamp((na * nb).sum(), -1.0, 1.0)
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    theta = torch.arccos(dot)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def test_slerp_union(mk, tmp_path):
    models = [mk["base"], mk["chatml"]]
    data = recipe(models, mk["base"], method="slerp", tokenizer_source="union")
    data["parameters"] = {"t": 0.5}
    for m in data["models"]:  # slerp has no per-model weight; weightops refuses one
        del m["parameters"]
    out = merge(data, tmp_path / "out")
    vocab = output_tokenizer(out).get_vocab()
    assert len(vocab) == 66 and set(CHAT) <= set(vocab)
    base, chatml, state = Rows(mk["base"]), Rows(mk["chatml"]), load_state(out)
    # slerp works on the whole matrix: re-assemble both aligned inputs, then interpolate.
    order = sorted(vocab, key=vocab.get)
    a = torch.stack([aligned(t, base, [base, chatml], base, EMBED) for t in order])
    b = torch.stack([aligned(t, chatml, [base, chatml], base, EMBED) for t in order])
    expect = slerp(a.flatten(), b.flatten(), 0.5).reshape(a.shape)
    torch.testing.assert_close(state[EMBED], expect)


def test_force_token(mk, tmp_path):
    data = recipe([mk["base"], mk["chatml"]], mk["base"])
    data["tokenizer"] = {
        "source": "union",
        "tokens": {
            "_tok_10": {"source": str(mk["chatml"]), "force": True},
            "_tok_11": {"source": str(mk["base"]), "force": True},
        },
    }
    out = merge(data, tmp_path / "out")
    vocab = output_tokenizer(out).get_vocab()
    assert len(vocab) == 66 and set(CHAT) <= set(vocab)
    base, chatml, state = Rows(mk["base"]), Rows(mk["chatml"]), load_state(out)
    torch.testing.assert_close(state[EMBED][vocab["_tok_10"]], chatml.row("_tok_10"))
    torch.testing.assert_close(state[EMBED][vocab["_tok_11"]], base.row("_tok_11"))
    torch.testing.assert_close(state[HEAD][vocab["_tok_10"]], chatml.row("_tok_10", HEAD))
    # an unforced token shared by both is their mean
    expect = (base.row("_tok_12") + chatml.row("_tok_12")) / 2
    torch.testing.assert_close(state[EMBED][vocab["_tok_12"]], expect)


def test_model_token_id(mk, tmp_path):
    data = recipe([mk["base"], mk["chatml"]], mk["base"])
    data["tokenizer"] = {
        "source": "base",
        "tokens": {
            "_tok_20": {
                "source": {"kind": "model_token", "model": str(mk["chatml"]), "token_id": 64},
                "force": True,
            },
            "_tok_21": {
                "source": {"kind": "model_token", "model": str(mk["base"]), "token": "<s>"},
                "force": True,
            },
        },
    }
    out = merge(data, tmp_path / "out")
    vocab = output_tokenizer(out).get_vocab()
    assert len(vocab) == 64 and "_tok_10" in vocab
    base, chatml, state = Rows(mk["base"]), Rows(mk["chatml"]), load_state(out)
    torch.testing.assert_close(state[EMBED][vocab["_tok_20"]], chatml.state[EMBED][64])
    torch.testing.assert_close(state[EMBED][vocab["_tok_21"]], base.row("<s>"))
    torch.testing.assert_close(state[HEAD][vocab["_tok_21"]], base.row("<s>", HEAD))


def test_pad_to_multiple_of(mk, tmp_path):
    data = recipe([mk["chatml"]], mk["chatml"])
    data["tokenizer"] = {"source": "base", "pad_to_multiple_of": 16}
    out = merge(data, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 80
    vocab = output_tokenizer(out).get_vocab()
    assert len(vocab) == 66 and set(CHAT) <= set(vocab)
    state, source = load_state(out), load_state(mk["chatml"])
    for name in (EMBED, HEAD):
        assert state[name].shape == (80, 16)
        torch.testing.assert_close(state[name][:66], source[name])
        mean = source[name].mean(0)
        torch.testing.assert_close(state[name][66:], mean.expand(14, 16))
    model = causal_lm(out, "auto")
    assert model.get_input_embeddings().weight.shape == (80, 16)


# ------------------------------------------------ defaults, methods, round trips


def test_union_without_base_averages_and_zeroes(chars, tmp_path):
    """No base model: a token two of three inputs have gets their mean; a token named
    under tokens: with no source that no model has gets zeros; a tied input's lm_head
    rows are its embedding rows."""
    models = [chars["a"], chars["b"], chars["c"], chars["tied"]]
    data = recipe(models)
    data["tokenizer"] = {"source": "union", "tokens": {"<new>": {}}}
    out = merge(data, tmp_path / "out")
    vocab = output_tokenizer(out).get_vocab()
    # a's 130 tokens, then b's chat tokens, then c's <tool>, then the configured token
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][130:] == [
        *CHAT,
        "<tool>",
        "<new>",
    ]
    state = load_state(out)
    assert state[EMBED].shape == (134, 16)
    torch.testing.assert_close(state[EMBED][vocab["<new>"]], torch.zeros(16))
    inputs = [Rows(m) for m in models]
    end = torch.stack([inputs[1].row("<|im_end|>"), inputs[2].row("<|im_end|>")]).mean(0)
    torch.testing.assert_close(state[EMBED][vocab["<|im_end|>"]], end)
    check_union_rows(out, models, None, lambda rows, b: torch.stack(rows).mean(0))


def test_task_arithmetic_on_aligned_rows(chars, tmp_path):
    models = [chars["a"], chars["b"], chars["c"]]
    data = recipe(models, chars["a"], method="task_arithmetic", tokenizer_source="union")
    data["models"][1]["parameters"]["weight"] = 0.7
    data["models"][2]["parameters"]["weight"] = 0.4

    def combine(rows, base):
        return base + 0.7 * (rows[1] - base) + 0.4 * (rows[2] - base)

    out = merge(data, tmp_path / "out")
    check_union_rows(out, models, chars["a"], combine)


def test_row_blocks_give_the_same_merge(chars, tmp_path):
    """Elementwise methods merge a vocabulary tensor in row blocks; each block gathers
    its own rows (runs of nearby ids), and the result is the same as in one piece."""
    models = [chars["a"], chars["b"], chars["c"]]
    data = recipe(models, chars["a"], tokenizer_source="union")
    data["tokenizer"] = {"source": "union", "pad_to_multiple_of": 64}
    del data["tokenizer_source"]
    whole = load_state(merge(data, tmp_path / "whole", chunk_elements=1 << 20))
    blocks = load_state(merge(data, tmp_path / "blocks", chunk_elements=16 * 7))
    for name in (EMBED, HEAD):
        assert whole[name].shape == (192, 16)
        torch.testing.assert_close(blocks[name], whole[name])


@pytest.mark.parametrize("settings", [{"tokenizer_source": "union"}, {"tokenizer": {}}])
def test_output_tokenizer_round_trips_and_the_model_loads(chars, tmp_path, settings):
    models = [chars["a"], chars["b"], chars["c"]]
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    data = recipe(models, chars["a"], chat_template=template, **settings)
    out = merge(data, tmp_path / "out")
    tok = output_tokenizer(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>hi<|im_end|>"
    )
    text = "<|im_start|>user\nhi there<|im_end|><tool>{}"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    vocab = tok.get_vocab()
    assert ids[0] == vocab["<|im_start|>"] and vocab["<tool>"] in ids
    model = causal_lm(out, "auto")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(vocab))


def test_different_vocab_sizes_without_tokenizer_settings_use_common_rows(chars, tmp_path):
    models = [chars["a"], chars["b"], chars["c"]]
    data = recipe(models, chars["a"], method="ties")
    data["parameters"] = {"density": 1.0}
    out = merge(data, tmp_path / "out")
    state = load_state(out)
    a, b, c = (load_state(m) for m in models)
    # TIES with density 1 keeps every entry: the elected sign (ties count as +), then
    # the mean of the task vectors that agree with it.
    db, dc = b[EMBED][:130] - a[EMBED], c[EMBED][:130] - a[EMBED]
    sign = torch.where(db + dc >= 0, 1.0, -1.0)
    keep_b, keep_c = (torch.sign(db) == sign).float(), (torch.sign(dc) == sign).float()
    expect = a[EMBED] + (db * keep_b + dc * keep_c) / (keep_b + keep_c).clamp(min=1)
    torch.testing.assert_close(state[EMBED], expect)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 130


# ------------------------------------------------------------- recipes and the CLI


def problems(text: str) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    return dict(info.value.problems)


def test_recipe_errors():
    head = "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
    both = problems(head + "tokenizer_source: union\ntokenizer: {source: base}\n")
    assert "not both" in both["tokenizer_source"]
    found = problems(
        head
        + "tokenizer:\n  tokens:\n"
        + "    y: {source: {kind: model_token, model: a, token: q, token_id: 3}}\n"
        + "    w: {source: {kind: zero, model: a}}\n"
        + "  pad_to_multiple_of: 0\n"
    )
    assert "exactly one of token or token_id" in found["tokenizer.tokens.y.source"]
    assert "takes no model" in found["tokenizer.tokens.w.source"]
    assert "tokenizer.pad_to_multiple_of" in found
    found = problems(
        head + "tokenizer:\n  tokens:\n    x: {source: elsewhere}\n    z: {force: true}\n"
    )
    assert "not one of the merged models" in found["tokenizer.tokens['x'].source"]
    assert "needs a source" in found["tokenizer.tokens['z'].force"]
    ok = parse_recipe(head + "tokenizer: {}\n")
    assert ok.tokenizer is not None and ok.tokenizer.source == "union"


def test_missing_token_source_is_a_plan_error(mk):
    data = recipe([mk["base"], mk["chatml"]], mk["base"])
    data["tokenizer"] = {
        "tokens": {
            "_tok_5": {"source": {"kind": "model_token", "model": str(mk["base"]), "token": "nope"}}
        }
    }
    with pytest.raises(MergeError, match="'nope' is not in the vocabulary"):
        build_plan(parse_recipe(yaml.safe_dump(data)))


def test_validate_and_dry_run_report_the_vocabulary(mk, tmp_path):
    path = tmp_path / "r.yaml"
    data = recipe([mk["base"], mk["padded"], mk["chatml"]], mk["base"])
    data["tokenizer"] = {"source": "union", "pad_to_multiple_of": 32}
    path.write_text(yaml.safe_dump(data))
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "66 tokens, 96 rows" in result.output
    result = runner.invoke(app, ["merge", str(path), "-o", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "66 tokens, 96 rows" in result.output
    assert "re-indexed" in result.output and "2 from the only model" in result.output
    assert f"{EMBED}  [96, 16]" in result.output


def test_slices_take_embeddings_from_the_first_slice_and_lm_head_from_the_last(chars, tmp_path):
    """Each vocabulary tensor's defaults come from the models merged in it: the
    embedding only from a (so tokens a lacks are zeros), lm_head only from b."""
    data = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(chars["a"]), "layer_range": [0, 1]}]},
            {"sources": [{"model": str(chars["b"]), "layer_range": [0, 1]}]},
        ],
        "tokenizer_source": "union",
    }
    out = merge(data, tmp_path / "out")
    vocab = output_tokenizer(out).get_vocab()
    a, b, state = Rows(chars["a"]), Rows(chars["b"]), load_state(out)
    assert state[EMBED].shape == state[HEAD].shape == (132, 16)
    for token, i in vocab.items():
        expect = a.row(token) if a.row(token) is not None else torch.zeros(16)
        torch.testing.assert_close(state[EMBED][i], expect)
        torch.testing.assert_close(state[HEAD][i], b.row(token, HEAD))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_tied_base_stays_tied(chars, tmp_path):
    models = [chars["tied"], chars["b"]]
    out = merge(recipe(models, chars["tied"], tokenizer_source="union"), tmp_path / "out")
    state = load_state(out)
    assert HEAD not in state and state[EMBED].shape == (133, 16)
    check_union_rows(out, models, chars["tied"], lambda rows, b: torch.stack(rows).mean(0))
    model = causal_lm(out, "auto")
    assert (
        model.get_output_embeddings().weight.data_ptr()
        == model.get_input_embeddings().weight.data_ptr()
    )


def test_new_token_from_a_model_token_and_a_model_without_tokenizer(chars, tmp_path):
    """A token no model has, named under tokens: with a model_token source, is appended
    and gets that row in every input; a model without tokenizer files is read with the
    base's vocabulary (as mergekit does)."""
    import shutil

    bare = Path(shutil.copytree(chars["c"], tmp_path / "bare"))
    for f in bare.glob("tokenizer*"):
        f.unlink()
    models = [chars["a"], bare]
    data = recipe(models, chars["a"])
    source = {"kind": "model_token", "model": str(bare), "token_id": 135}
    data["tokenizer"] = {"source": "union", "tokens": {"<think>": {"source": source}}}
    out = merge(data, tmp_path / "out")
    vocab = output_tokenizer(out).get_vocab()
    assert len(vocab) == 131 and vocab["<think>"] == 130
    a, c, state = load_state(chars["a"]), load_state(bare), load_state(out)
    torch.testing.assert_close(state[EMBED][:130], (a[EMBED] + c[EMBED][:130]) / 2)
    torch.testing.assert_close(state[EMBED][130], c[EMBED][135])
    torch.testing.assert_close(state[HEAD][130], c[HEAD][135])


def test_base_tokenizer_is_trimmed_to_its_embedding_rows(mk, tmp_path):
    """padded's tokenizer lists four tokens past its 64 rows: as the base they are
    dropped, so the output has 64 tokens with their ids."""
    models = [mk["padded"], mk["base"]]
    out = merge(recipe(models, mk["padded"], tokenizer_source="base"), tmp_path / "out")
    tok = output_tokenizer(out)
    vocab = tok.get_vocab()
    assert len(vocab) == 64 and not set(UNUSED) & set(vocab)
    assert tok("<s></s>", add_special_tokens=False).input_ids == [1, 2]
    assert tok.convert_tokens_to_ids("_tok_63") == 63
    expect = (load_state(mk["padded"])[EMBED] + load_state(mk["base"])[EMBED]) / 2
    torch.testing.assert_close(load_state(out)[EMBED], expect)


def test_tokenizer_block_round_trips_through_to_yaml():
    first = parse_recipe(
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
        "tokenizer:\n  source: base\n  pad_to_multiple_of: 8\n  tokens:\n"
        "    '<x>': {source: {kind: model_token, model: a, token_id: 3}, force: true}\n"
        "    '<y>': {source: {kind: zero}}\n    '<z>': {source: a}\n"
    )
    second = parse_recipe(first.to_yaml())
    assert second == first
    assert second.tokenizer.tokens["<x>"].source.token_id == 3
