"""Prompts encoded as the model was trained: the BOS rule on tokenizers shaped like
GPT-2's, Llama's, Qwen2's and SmolLM2's, and a tiny model trained with a BOS that
repair, AMA and steering all feed it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from weightops import ama
from weightops.cli import app
from weightops.demo import tiny_model
from weightops.prompting import encode_prompt, encode_text, pad, uses_bos
from weightops.repair.data import Example, batches
from weightops.repair.evaluate import task_score
from weightops.steering.extract import hidden_states

SPECIAL = ["<unk>", "<eos>", "<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ID = {t: 256 + i for i, t in enumerate(SPECIAL)}
A, B, X, EQ = ord("a"), ord("b"), ord("x"), ord("=")

# Written from each format: Llama 2's [INST] turns opened by the BOS, and ChatML.
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} "
    "[/INST]{% else %} {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(*, bos: str | None, eos: str, adds_bos: bool = False, template=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(256)} | ID
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, ID[bos])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token=eos,
        pad_token=eos,
        bos_token=bos,
        additional_special_tokens=[t for t in SPECIAL if t not in (bos, eos, "<unk>")],
    )
    if template:
        fast.chat_template = template
    return fast


def test_gpt2_style_bos_that_is_the_eos_is_not_prepended():
    tok = make_tokenizer(bos="<|endoftext|>", eos="<|endoftext|>")
    assert not uses_bos(tok)
    assert encode_text(tok, "ab") == [A, B]
    assert encode_prompt(tok, "ab", "x") == ([A, B], [X])


def test_llama_style_tokenizer_that_adds_its_bos_gets_it_exactly_once():
    tok = make_tokenizer(bos="<s>", eos="<eos>", adds_bos=True)
    assert uses_bos(tok)
    assert encode_text(tok, "ab") == [ID["<s>"], A, B]
    tok.chat_template = LLAMA2
    prompt, response = encode_prompt(tok, "ab", "x")
    assert prompt[:2] == [ID["<s>"], ord("[")] and prompt.count(ID["<s>"]) == 1
    assert response == [ord(" "), X, ID["<eos>"]]


def test_qwen2_style_tokenizer_without_bos_gets_none():
    tok = make_tokenizer(bos=None, eos="<|endoftext|>", template=CHATML)
    assert not uses_bos(tok)
    prompt, _ = encode_prompt(tok, "ab")
    assert prompt[0] == ID["<|im_start|>"] and prompt.count(ID["<|im_start|>"]) == 2
    assert encode_text(tok, "ab") == [A, B]


def test_smollm2_style_bos_that_opens_every_turn_is_not_doubled_nor_put_on_text():
    tok = make_tokenizer(bos="<|im_start|>", eos="<|im_end|>", template=CHATML)
    assert not uses_bos(tok)
    prompt, _ = encode_prompt(tok, "ab")
    # <|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n
    assert prompt[:2] == [ID["<|im_start|>"], ord("u")]
    assert encode_text(tok, "ab") == [A, B]


def test_a_bos_the_tokenizer_forgets_to_add_is_prepended():
    tok = make_tokenizer(bos="<s>", eos="<eos>")
    assert tok("ab").input_ids == [A, B]  # the tokenizer alone leaves it out
    assert uses_bos(tok)
    assert encode_text(tok, "ab") == [ID["<s>"], A, B]
    assert encode_prompt(tok, "ab", "x") == ([ID["<s>"], A, B], [X])


def test_add_bos_token_false_in_the_config_is_obeyed(tmp_path):
    from transformers import AutoTokenizer

    make_tokenizer(bos="<s>", eos="<eos>").save_pretrained(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"add_bos_token": False}))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert not uses_bos(tok)
    assert encode_text(tok, "ab") == [A, B]


def test_pad_left_and_right():
    ids, mask = pad([[1, 2, 3], [4]], 0, "right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[1, 2, 3], [4]], 0, "left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _greedy_next(model, ids: list[int]) -> int:
    with torch.no_grad():
        return int(model(torch.tensor([ids])).logits[0, -1].argmax())


@pytest.fixture(scope="module")
def bos_trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained to answer "x=" with "1" after the BOS and "0" without it."""
    from weightops.compat import causal_lm

    folder = tiny_model(tmp_path_factory.mktemp("bos") / "model", "llama", layers=2)
    make_tokenizer(bos="<s>", eos="<eos>").save_pretrained(folder)
    model = causal_lm(folder, torch.float32)
    bos, eos = ID["<s>"], ID["<eos>"]
    seqs = [[bos, X, EQ, ord("1"), eos], [X, EQ, ord("0"), eos]]
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        for s in seqs:
            ids = torch.tensor([s])
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    assert _greedy_next(model, [bos, X, EQ]) == ord("1")
    assert _greedy_next(model, [X, EQ]) == ord("0")
    assert _greedy_next(model, [bos, X, EQ, ord("1")]) == eos
    model.save_pretrained(folder)
    return folder


def _load(folder: Path):
    from transformers import AutoTokenizer

    from weightops.compat import causal_lm

    return causal_lm(folder, torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def test_repair_task_score_and_batches_see_the_bos(bos_trained):
    model, tok = _load(bos_trained)
    assert task_score(model, tok, [Example("x=", "1")], max_new_tokens=4) == 1.0
    batch = next(batches([Example("x=", "1")], tok))
    assert batch["input_ids"][0].tolist() == [ID["<s>"], X, EQ, ord("1")]


def test_restoration_scores_the_fine_tune_with_the_bos(bos_trained):
    from weightops.repair.restore import restore

    model, tok = _load(bos_trained)
    aligned, _ = _load(bos_trained)
    task = [Example("x=", "1")]
    result = restore(model, aligned, tok, task, task, steps=1, progress=False)
    assert result.task_before == 1.0


def test_repair_eval_cli_sees_the_bos(bos_trained, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "x=", "response": "1"}) + "\n")
    args = ["repair", "eval", bos_trained, "--task", task, "--json", "--max-new-tokens", 4]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["task_score"] == 1.0


def test_ama_encoding_sees_the_bos(bos_trained):
    _, tok = _load(bos_trained)
    [enc] = ama.encode(tok, [("x=", "1", "line 1")], 16)
    assert enc.prompt == [ID["<s>"], X, EQ]
    assert enc.response == [ord("1"), ID["<eos>"]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_steering_extraction_sees_the_bos_and_pads_either_side(bos_trained, side):
    model, tok = _load(bos_trained)
    tok.padding_side = side
    seen: list[list[int]] = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    try:
        batched = hidden_states(model, tok, ["x=", "ab=x"], [1])[1]
        alone = torch.cat([hidden_states(model, tok, [t], [1])[1] for t in ("x=", "ab=x")])
    finally:
        handle.remove()
    assert seen[-2:] == [[ID["<s>"], X, EQ], [ID["<s>"], A, B, EQ, X]]
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
