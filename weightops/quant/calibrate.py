"""Calibration: the second moment of each quantized matrix's inputs.

For a linear layer y = W x, the squared output error of a perturbed W is, summed over
calibration tokens, Σᵢ Σⱼₖ (ΔW)ᵢⱼ (ΔW)ᵢₖ Hⱼₖ with H = mean x xᵀ. The quantizer chooses
codes to minimise exactly that (GPTQ-style error feedback), and weighs each input's
error by H's diagonal, the mean of xⱼ², when choosing clip ranges and 4-bit groups.

`LayerwiseCalibration` does this one decoder layer at a time, as `quantize_model` needs
it: the calibration activations are carried from layer to layer through a one-layer
copy of the model, so memory holds one layer's weights, its Hessians and the
activations, whatever the depth. Each layer sees the activations of the unquantized
layers before it (not of the quantized ones, as sequential GPTQ does), so the result
does not depend on the order the matrices are quantized in.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from weightops.arch import describe, embedding_name, layer_count_key, rename_layer
from weightops.compat import causal_lm_from_config
from weightops.io.checkpoint import Checkpoint
from weightops.io.jsonl import JsonlError, read_jsonl
from weightops.io.safetensors_file import FileReader
from weightops.quant.mixed import QuantError
from weightops.steering.layers import find_layers

MIN_TOKENS = 64


def read_texts(path: str | Path) -> list[str]:
    """Plain text (one document) or JSONL with a "text" or "prompt" field per line."""
    path = Path(path)
    if path.suffix != ".jsonl":
        from weightops.io.jsonl import MAX_DATA_BYTES
        from weightops.io.safe_read import decode_utf8, read_regular

        data = read_regular(path, "calibration data", limit=MAX_DATA_BYTES, error=QuantError)
        return [decode_utf8(data, str(path), "calibration data", error=QuantError)]
    try:
        rows = read_jsonl(path, what="calibration data")
    except JsonlError as e:
        raise QuantError(e.message, hint=e.hint) from e
    texts = []
    for n, row in rows:
        text = row.get("text") or row.get("prompt")
        if not isinstance(text, str):
            raise QuantError(f"{path}:{n}: expected a JSON object with 'text' or 'prompt'")
        texts.append(text)
    return texts


class _Stop(Exception):
    """Ends a forward pass once the block of interest has run."""


class LayerwiseCalibration:
    """Hessians of the linear inputs of one decoder layer at a time (see module doc).

    `layer(i)` returns {weight name: mean x xᵀ} for the linears of block i and moves the
    activations past it; layers must be asked for in increasing order. token_weights:
    {weight name: [per window, a weight sₜ per token]}: those names get Σ sₜ xₜ xₜᵀ / Σ sₜ
    instead (weightops.quant.sensitivity's weights, for the calibrated quantizer).
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        texts: list[str],
        *,
        max_tokens: int = 8192,
        window: int = 512,
        token_weights: dict[str, list[torch.Tensor]] | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from weightops.demo import quiet_transformers

        quiet_transformers()
        self.ckpt = ckpt
        self.token_weights = token_weights
        tok = AutoTokenizer.from_pretrained(ckpt.folder)
        ids = [tok(t, return_tensors="pt").input_ids[0] for t in texts if t.strip()]
        flat = torch.cat(ids)[:max_tokens] if ids else torch.zeros(0, dtype=torch.long)
        if flat.numel() < MIN_TOKENS:
            raise QuantError(
                f"calibration data has {flat.numel()} tokens; at least {MIN_TOKENS} are needed"
            )
        self.config = AutoConfig.from_pretrained(ckpt.folder)
        self.next_layer = 0
        self._stubs: dict[Any, torch.nn.Module] = {}
        embed = embedding_name(ckpt.tensors)
        if embed is None:
            raise QuantError(f"{ckpt.path}: no token embedding to calibrate from")
        # The model's own embedding module (Gemma's scales its output) over just the
        # rows the calibration text uses, so the full table is never held twice.
        used, local = torch.unique(flat, return_inverse=True)
        lookup = copy.deepcopy(self.stub(0).get_input_embeddings())
        with FileReader() as reader:
            rows = reader.read(ckpt.tensors[embed]).float()[used]
        lookup.weight = torch.nn.Parameter(rows, requires_grad=False)
        lookup.num_embeddings = rows.shape[0]
        windows = [local[i : i + window] for i in range(0, flat.numel(), window)]
        # What block 0 receives may differ from the embeddings still (position
        # embeddings, scaling in the model's forward), so it is read off the model.
        with torch.no_grad():
            self.acts = [self.run(0, lookup(w).unsqueeze(0), capture_input=True) for w in windows]
        # The windows' token ids, the targets of a loss on the calibration text.
        self.tokens = [used[w] for w in windows]

    def stub(self, index: int) -> torch.nn.Module:
        """A one-block model shaped like block `index` (blocks differ only by type)."""

        types = getattr(self.config, "layer_types", None)
        kind = types[index] if types else None
        if kind not in self._stubs:
            cfg = copy.deepcopy(self.config)
            setattr(cfg, layer_count_key(cfg.to_dict()) or "num_hidden_layers", 1)
            if types:
                cfg.layer_types = [kind]
            # The stub never looks tokens up, and logits are computed outside it
            # (weightops.quant.sensitivity): a tiny vocabulary keeps its embedding and
            # lm_head from costing a full model's memory.
            cfg.vocab_size, cfg.pad_token_id = 8, None
            self._stubs[kind] = causal_lm_from_config(cfg, torch.float32).eval()
        return self._stubs[kind]

    def run(
        self,
        index: int,
        hidden: torch.Tensor,
        *,
        capture_input: bool = False,
        pre_hooks: dict[str, Any] | None = None,
        hooks: dict[str, Any] | None = None,
        grad: bool = False,
    ) -> torch.Tensor:
        """Block `index`'s output for the input `hidden` (or, with capture_input, the
        input the model hands block 0 when fed `hidden` as input embeddings).
        pre_hooks / hooks: forward pre-hooks / forward hooks by module name in the stub.
        grad: keep the autograd graph (for a backward pass through the block)."""
        stub = self.stub(index)
        block = find_layers(stub).blocks[0]
        out: list[torch.Tensor] = []

        def swap(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            if capture_input:
                out.append(args[0] if args else kwargs["hidden_states"])
                raise _Stop
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        def grab(module: torch.nn.Module, args: tuple, output: Any) -> None:
            out.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handles = [
            block.register_forward_pre_hook(swap, with_kwargs=True),
            block.register_forward_hook(grab),
        ]
        for name, hook in (pre_hooks or {}).items():
            handles.append(stub.get_submodule(name).register_forward_pre_hook(hook))
        for name, hook in (hooks or {}).items():
            handles.append(stub.get_submodule(name).register_forward_hook(hook))
        try:
            with torch.set_grad_enabled(grad):
                stub(inputs_embeds=hidden.detach() if capture_input else torch.zeros_like(hidden))
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return out[0] if grad else out[0].detach()

    def load_layer(self, index: int) -> dict[str, str]:
        """Load block `index`'s weights into its stub; return its linears as {module name
        in the stub: weight name in the checkpoint}."""
        stub = self.stub(index)
        prefix = find_layers(stub).path + ".0."
        own = [n for n in self.ckpt.tensors if describe(n).layer == index]
        state = {}
        with FileReader() as reader:
            for name in own:
                state[rename_layer(name, 0)] = reader.read(self.ckpt.tensors[name]).float()
        missing = [k for k in stub.state_dict() if k.startswith(prefix) and k not in state]
        unknown = [k for k in state if not k.startswith(prefix)]
        if unknown or missing:
            raise QuantError(
                f"{self.ckpt.path}: layer {index} does not match its config "
                f"(missing {missing[:3]}, unexpected {unknown[:3]})"
            )
        stub.load_state_dict(state, strict=False)
        return {
            rename_layer(n, 0)[: -len(".weight")]: n
            for n in own
            if n.endswith(".weight")
            and isinstance(
                stub.get_submodule(rename_layer(n, 0)[: -len(".weight")]), torch.nn.Linear
            )
        }

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        if index != self.next_layer:
            raise QuantError(
                f"calibration moves forward one layer at a time: asked for layer {index}, "
                f"at layer {self.next_layer}"
            )
        linears = self.load_layer(index)
        hessians = _Accumulator(list(linears.values()), self.token_weights)
        hooks = {module: hessians.hook(name) for module, name in linears.items()}
        acts = []
        for h in self.acts:
            # Inputs of one window are told apart by identity; a new window starts afresh.
            hessians.start_window()
            acts.append(self.run(index, h, pre_hooks=hooks))
        hessians.start_window()
        self.acts = acts
        self.next_layer += 1
        return hessians.result()


class _Accumulator:
    """Running Σ x xᵀ per weight name; projections fed the very same input tensor
    (q/k/v, gate/up) share one matrix. token_weights: {name: [per window, a weight per
    token]}; those names get the weighted mean Σ sₜ xₜ xₜᵀ / Σ sₜ, each its own."""

    def __init__(
        self, names: list[str], token_weights: dict[str, list[torch.Tensor]] | None = None
    ) -> None:
        self.names = names
        self.weights = token_weights or {}
        self.window = -1
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.owner: dict[str, str] = {}
        self.seen: dict[int, tuple[torch.Tensor, str]] = {}  # holds x so its id stays unique

    def start_window(self) -> None:
        self.seen.clear()
        self.window += 1

    def hook(self, name: str):  # type: ignore[no-untyped-def]
        def pre_hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            flat = x.detach().float().reshape(-1, x.shape[-1])
            if name in self.weights:
                s = self.weights[name][self.window].reshape(-1, 1).float()
                self.sums[name] = self.sums.get(name, 0) + (flat * s).T @ flat
                self.counts[name] = self.counts.get(name, 0) + float(s.sum())
                return
            if name in self.owner:
                return
            if id(x) in self.seen and not self.counts.get(name):
                self.owner[name] = self.seen[id(x)][1]
                return
            self.seen[id(x)] = (x, name)
            self.sums[name] = self.sums.get(name, 0) + flat.T @ flat
            self.counts[name] = self.counts.get(name, 0) + flat.shape[0]

        return pre_hook

    def result(self) -> dict[str, torch.Tensor]:
        for name in self.sums:
            # All-zero weights leave a zero matrix (GPTQ then treats every input alike).
            self.sums[name] /= self.counts[name] or 1.0
        return {name: self.sums[self.owner.get(name, name)] for name in self.names}


@torch.no_grad()
def model_hessians(
    model: torch.nn.Module, windows: list[torch.Tensor], names: list[str]
) -> dict[str, torch.Tensor]:
    """{weight name: mean x xᵀ} of a loaded model's linear inputs over token windows."""
    acc = _Accumulator(names)
    handles = [
        model.get_submodule(name[: -len(".weight")]).register_forward_pre_hook(acc.hook(name))
        for name in names
    ]
    try:
        for ids in windows:
            acc.start_window()
            model(ids.reshape(1, -1))
    finally:
        for h in handles:
            h.remove()
    return acc.result()
