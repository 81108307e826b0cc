"""GGUF export run by llama.cpp: SmolLM2-135M-Instruct through `weightops quantize gguf`,
loaded by llama-cpp-python, a chat answer, and perplexity against weightops' own.

Steps: export the checkpoint (bench/real_model.py builds it) with Q2_K (rows of 576
fall back to Q4_0, as llama.cpp's quantizer does) and with Q4_K (fallback Q5_0); in a
virtualenv with llama-cpp-python (bench/.work/venv-llamacpp, built from source on first
use, ~10+ minutes) load the file, answer one chat question with the file's own chat template,
and compute perplexity on the same token ids in the same windows as weightops does; in
this process read the file back, dequantize every tensor with the `gguf` package, put
the q/k rows back in Hugging Face order and compute the perplexity of those weights
through transformers (float32), once as they are and once with each block linear's
input rounded to 8 bits as llama.cpp's CPU kernels round it. All use the token ids of
transformers' tokenizer; llama.cpp's own tokenization of the text is compared with them.

Text: the Python reference manual's help() pages shipped in the standard library
(pydoc_data.topics), topics in sorted order, the first 2048 tokens, windows of 512.

    python bench/gguf_llamacpp.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import WORK
from real_model import smollm2
from report import machine, write_section

from weightops.io.checkpoint import Checkpoint
from weightops.quant.evaluate import perplexity
from weightops.quant.gguf_export import export_gguf
from weightops.quant.gguf_llama import gguf_names

VENV = WORK / "venv-llamacpp"
TOKENS = 2048
WINDOW = 512
QUESTION = "What is the capital of France? Answer in one sentence."

# Runs inside the llama-cpp-python virtualenv: argv = gguf path, ids json, window.
_LLAMA_CPP = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama

path, ids_file, window, question = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ids = json.load(open(ids_file))
text = json.load(open(ids_file + ".text"))
llm = Llama(model_path=path, n_ctx=window + 1, logits_all=True, n_threads=2, verbose=False)
nll, count = 0.0, 0
for start in range(0, len(ids) - 1, window):
    chunk = ids[start : start + window + 1]
    if len(chunk) < 2:
        break
    llm.reset()
    llm.eval(chunk)
    logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
    count += len(chunk) - 1
own = llm.tokenize(text.encode(), add_bos=False, special=False)[: len(ids)]
llm.reset()
answer = llm.create_chat_completion(
    messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0.0
)["choices"][0]["message"]["content"]
print(json.dumps({
    "perplexity": float(np.exp(nll / count)),
    "tokens": count,
    "same_tokenization": own == ids,
    "answer": answer,
    "version": llama_cpp.__version__,
}))
"""


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=OFF")
    subprocess.run([str(python), "-m", "pip", "install", "llama-cpp-python"], check=True, env=env)
    return python


def english_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def dequantized_state(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    """The GGUF file's tensors as float32 under their Hugging Face names."""
    import gguf

    config = json.loads((folder / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    back = {
        new: old
        for old, new in gguf_names(
            list(Checkpoint(folder).tensors), "llama", config, folder
        ).items()
        if new is not None
    }
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            # permute's inverse: the same reshape read the other way round.
            h = n_head if ".attn_q." in t.name else n_kv
            w = w.reshape(h, shape[0] // h // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
        state[back[t.name]] = torch.from_numpy(w)
    return state


def round_activations(model: torch.nn.Module) -> list:
    """Round each block linear's input as llama.cpp's CPU kernels do before the dot
    product: int8 blocks of 32 with an fp16 scale (Q8_0) against Q4_0 / Q5_0 weights,
    blocks of 256 with a float32 scale (Q8_K) against k-quants. Returns the hook handles."""

    def q8(x: torch.Tensor, block: int) -> torch.Tensor:
        xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
        d = xb.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1)), 0)
        d = d.half().float() if block == 32 else d
        return (q * d).reshape(x.shape)

    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            block = 256 if mod.in_features % 256 == 0 else 32
            hook = lambda _m, args, block=block: (q8(args[0], block),)  # noqa: E731
            handles.append(mod.register_forward_pre_hook(hook))
    return handles


def run_llama_cpp(python: Path, path: Path, ids_file: Path) -> dict:
    run = subprocess.run(
        [str(python), "-c", _LLAMA_CPP, str(path), str(ids_file), str(WINDOW), QUESTION],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise SystemExit(f"llama.cpp failed on {path}:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    folder = smollm2()
    python = ensure_venv()
    WORK.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(english_text()).input_ids[:TOKENS]
    ids_file = WORK / "gguf_ids.json"
    ids_file.write_text(json.dumps(ids))
    # The text of exactly these tokens, for llama.cpp's own tokenization.
    Path(str(ids_file) + ".text").write_text(json.dumps(tok.decode(ids)))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ppl_original = perplexity(model, torch.tensor(ids), WINDOW)
    print(f"bf16 checkpoint in transformers: perplexity {ppl_original:.3f}")

    rows, files, answers = [], [], []
    for qtype in ("Q2_K", "Q4_K"):
        out = WORK / f"smollm2-135m-instruct-{qtype}.gguf"
        t0 = time.time()
        report = export_gguf(folder, out, default=qtype)
        export_s = time.time() - t0
        counts = ", ".join(
            f"{t} {n}" for t, n in sorted(report["counts"].items(), key=lambda kv: -kv[1])
        )
        model.load_state_dict(dequantized_state(out, folder), strict=False)
        ppl_ours = perplexity(model, torch.tensor(ids), WINDOW)
        handles = round_activations(model)
        ppl_rounded = perplexity(model, torch.tensor(ids), WINDOW)
        for h in handles:
            h.remove()
        got = run_llama_cpp(python, out, ids_file)
        gap = got["perplexity"] / ppl_ours - 1
        gap_rounded = got["perplexity"] / ppl_rounded - 1
        print(
            f"{qtype}: {counts}; transformers {ppl_ours:.3f} ({ppl_rounded:.3f} with rounded "
            f"activations), llama.cpp {got['perplexity']:.3f}"
        )
        print(f"  answer: {got['answer']!r}")
        rows.append(
            f"| --type {qtype} | {report['bits_per_weight']:.3f} | {ppl_ours:.3f} | "
            f"{ppl_rounded:.3f} | {got['perplexity']:.3f} | {gap:+.2%} | {gap_rounded:+.2%} |"
        )
        files.append(
            f"- --type {qtype}: {report['bytes'] / 2**20:.1f} MiB, tensors {counts}, "
            f"export {export_s:.1f} s; llama.cpp's tokenization of the text "
            f"{'equals' if got['same_tokenization'] else 'differs from'} transformers'"
        )
        answers.append(f'- --type {qtype}: "{" ".join(got["answer"].split())}"')

    body = (
        "SmolLM2-135M-Instruct (bench/real_model.py; its weights already went through Q4_1 "
        "on their way into the package that ships it) exported by `weightops quantize gguf`; "
        "llama-cpp-python (llama.cpp built from source, CPU) loads each file as it is "
        f"(pre-tokenizer `{report['pre_tokenizer']}`, chat template from the file). "
        f"Perplexity on the first {len(ids)} tokens of the standard library's "
        f"pydoc_data.topics (topics in sorted order), windows of {WINDOW}, the same token ids "
        "everywhere. transformers column: the file's tensors dequantized by the `gguf` "
        "package, q/k rows put back in Hugging Face order, run in float32; llama.cpp runs "
        "its own kernels on the packed blocks, which round each matrix product's input "
        "activations to 8 bits (Q8_0 blocks of 32 against Q4_0 / Q5_0, Q8_K blocks of 256 "
        "against k-quants); the third column rounds them the same way in transformers.\n\n"
        "- Command: `python bench/gguf_llamacpp.py`\n"
        f"- Machine: {machine()}\n"
        f"- Peer: llama-cpp-python {got['version']} (own virtualenv, bench/.work/venv-llamacpp)\n"
        f"- Total wall time: {(time.time() - started) / 60:.1f} min\n\n"
        "| export | bits per quantized weight | perplexity, transformers | "
        "transformers, activations rounded | perplexity, llama.cpp | llama.cpp vs "
        "transformers | llama.cpp vs rounded |\n|---|---|---|---|---|---|---|\n"
        f"| bf16 checkpoint | 16 | {ppl_original:.3f} | | | | |\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(files)
        + f'\n\nChat answers from llama.cpp (temperature 0) to "{QUESTION}":\n\n'
        + "\n".join(answers)
        + "\n"
    )
    write_section("gguf_llamacpp", "GGUF export: SmolLM2-135M in llama.cpp", body)


if __name__ == "__main__":
    main()
