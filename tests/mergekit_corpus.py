"""mergekit's own recipes (tests/mergekit_configs/) and the tiny models they run on.

Each YAML file there is one recipe from mergekit's examples/ or one merge
configuration its test suite builds, with model names replaced by placeholders such as
`{model_a}`. `build_family` saves a tiny checkpoint for every placeholder, shaped like
the models mergekit's tests make (small Llama-like models, Granite, GPT-2, LLaVA,
tokenizers with added tokens); `render` fills a recipe's placeholders with their paths.
Used by tests/test_mergekit_configs.py and bench/mergekit_parity.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from weightops.demo import fine_tune, quiet_transformers, tiny_model

CONFIGS = Path(__file__).resolve().parent / "mergekit_configs"
MERGEKIT_COMMIT = "a6e4028"
# Recipes that mergekit's own tests expect to be refused.
EXPECT_ERROR = {
    "test_basic_merges.test_della_invalid_epsilon": "epsilon 1.35 is out of range",
}
# The shapes of mergekit's test models (tests/common.py): tiny Llama-like decoders.
PICO = dict(hidden_size=32, intermediate_size=48, num_attention_heads=16, num_key_value_heads=16)
DTYPE = torch.bfloat16


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def placeholders(name: str) -> set[str]:
    return set(re.findall(r"\{(\w+)\}", (CONFIGS / f"{name}.yaml").read_text()))


def render(name: str, family: dict[str, Path]) -> str:
    """The recipe text with each `{placeholder}` replaced by its model's path."""
    text = (CONFIGS / f"{name}.yaml").read_text()
    return re.sub(r"\{(\w+)\}", lambda m: str(family[m.group(1)]), text)


def _save_tokenizer(folder: Path, added: list[str], vocab: int = 64) -> None:
    """A BPE tokenizer of `vocab` plain tokens (<unk>, <s>, </s>, _tok_3, …) without
    merges, plus `added` tokens after them: the tokenizer mergekit's tokenizer tests use."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    names = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(names)}, merges=[]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_tokens(added)
    fast.save_pretrained(folder)


def _llava(folder: Path, seed: int) -> Path:
    """A random LLaVA (CLIP vision tower + Llama text model), as mergekit's VLM tests use."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=4,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_size=64,
        intermediate_size=128,
    )
    text = LlamaConfig(vocab_size=64, num_hidden_layers=2, **PICO)
    torch.manual_seed(seed)
    model = Llava(LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16))
    model.to(DTYPE).save_pretrained(folder)
    return folder


def build_family(root: Path, only: set[str] | None = None) -> dict[str, Path]:
    """Save a tiny checkpoint for every placeholder of the corpus (or those in `only`)
    under `root`; return {placeholder: folder}."""
    quiet_transformers()
    root = Path(root)
    want = only if only is not None else {p for n in config_names() for p in placeholders(n)}
    out: dict[str, Path] = {}

    def need(*names: str) -> bool:
        return any(n in want for n in names)

    def pico(name: str, family: str = "llama", **kw) -> Path:
        kw.setdefault("vocab", 64)
        kw.setdefault("tokenizer", False)
        return tiny_model(root / name, family, seed=0, layers=2, dtype=DTYPE, **(PICO | kw))

    if need("model_a", "model_b", "model_c", "model_base", "model_padded"):
        # Fine-tunes of one base, so task vectors are small and merges meaningful.
        out["model_a"] = pico("model_a")
        for i, name in enumerate(["model_b", "model_c", "model_base", "model_padded"], 1):
            out[name] = fine_tune(out["model_a"], root / name, seed=i)
        _save_tokenizer(out["model_base"], [])
        _save_tokenizer(out["model_padded"], [f"<UNUSED_{i}>" for i in range(4)])
    if need("model_chatml"):
        out["model_chatml"] = pico("model_chatml", vocab=66)
        _save_tokenizer(out["model_chatml"], ["<|im_start|>", "<|im_end|>"])
    if need("granite_a", "granite_b"):
        out["granite_a"] = pico("granite_a", "granite", num_key_value_heads=2)
        out["granite_b"] = fine_tune(out["granite_a"], root / "granite_b", seed=1)
    if need("gpt2_like"):
        # test_gpt2_stack slices layers 0-12, so twelve layers, narrow.
        out["gpt2_like"] = tiny_model(
            root / "gpt2_like", "gpt2", layers=12, vocab=64, tokenizer=False, dtype=DTYPE, n_embd=32
        )
    for i, name in enumerate(["vlm_a", "vlm_b", "vlm_c"]):
        if need(name):
            out[name] = _llava(root / name, seed=i)
    examples = ["llama2_base", "orca_mini", "platypus2", "wizardlm", "wizardmath"]
    if need(*examples):
        # gradient-slerp and orcamini-platy-44layer slice up to layer 40.
        base = tiny_model(
            root / "llama2_base",
            "llama",
            layers=40,
            dtype=DTYPE,
            hidden_size=32,
            intermediate_size=48,
        )
        out["llama2_base"] = base
        for i, name in enumerate(examples[1:], 1):
            out[name] = fine_tune(base, root / name, seed=i)
    mistral = ["mistral_base", "mistral_instruct", "biomistral"]
    if need(*mistral):
        base = tiny_model(root / "mistral_base", "mistral", layers=2, dtype=DTYPE)
        out["mistral_base"] = base
        for i, name in enumerate(mistral[1:], 1):
            out[name] = fine_tune(base, root / name, seed=i)
    return {k: v for k, v in out.items() if k in want}


def check_output(name: str, folder: Path, family: dict[str, Path]) -> None:
    """The checks mergekit's own test makes on this recipe's output, where it makes
    one beyond "it ran" (layer counts, zeroed tensors, tokenizer and chat template)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in folder.glob("*.safetensors"):
        tensors.update(load_file(f))
    assert tensors, "no tensors written"
    assert all(not t.isnan().any() for t in tensors.values()), "NaN in the output"
    test = name.split(".")[1] if "." in name else name
    if test == "test_gpt2_stack":
        assert config["n_layer"] == 24
    if test == "test_passthrough_scale":
        o_proj = [t for n, t in tensors.items() if "o_proj" in n]
        assert o_proj and all((t == 0).all() for t in o_proj)
    if name.startswith("test_chat_template."):
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        needle = "<|im_start|>" if test == "test_template_chatml" else "{{messages[0]['content']}}"
        assert template and needle in template
    vocab_sizes = {
        "test_legacy_mode": 64,
        "test_source_base": 64,
        "test_source_model": 66,
        "test_source_union": 66,
        "test_slerp_union": 66,
    }
    if test in vocab_sizes:
        from transformers import AutoTokenizer

        assert len(AutoTokenizer.from_pretrained(folder).get_vocab()) == vocab_sizes[test]


def run_weightops(name: str, family: dict[str, Path], out: Path, numerics: str = "default") -> Path:
    """Merge one corpus recipe with weightops' Python API into `out`."""
    return run_recipe(render(name, family), name, out, numerics)


def run_recipe(text: str, source: str, out: Path, numerics: str = "default") -> Path:
    """Merge recipe `text` (model paths filled in) into `out`."""
    from weightops.engine.plan import build_plan
    from weightops.engine.run import RunOptions, execute
    from weightops.recipe import parse_recipe

    recipe = parse_recipe(text, source, recipe_dir=out.parent)
    plan = build_plan(recipe, out.parent, numerics=numerics)
    return execute(plan, out, RunOptions(device="cpu", progress=False))
