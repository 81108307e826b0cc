"""Loss barrier on the linear path between two independently trained networks, before
and after weight matching (weightops.align), on scikit-learn's bundled digits data.

Two networks of the same shape are trained from different seeds (initialisation and
data order). Along θ(α) = (1 − α)·θ_A + α·θ_B the barrier is

    max over α of  L(θ(α)) − [(1 − α)·L(θ_A) + α·L(θ_B)]

(cross-entropy, on the training and the test split). It is measured with B as trained
and with B permuted by `weightops.align.weight_matching` to match A. Permuting B does
not change its function, only which of its units sit opposite A's.

- MLPs 64 → w → w → w → 10 (ReLU) at several widths w; the spec names one
  permutation group per hidden layer.
- A small pre-norm transformer: each 8×8 image is 8 tokens of 8 pixels (a row each),
  2 blocks of GQA attention (4 query heads, 2 key/value heads) and a GELU MLP,
  mean-pooled into a classifier. Its tensors carry Llama-style names, so its
  permutation groups (residual stream, MLP units, heads) come from the same
  `transformer_spec` that `weightops align` uses for checkpoints.

Run:  python bench/align_barrier.py            (about 5 minutes on one CPU thread)
      python bench/align_barrier.py --quick    (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from weightops.align import Axis, DictSource, PermSpec, permute, transformer_spec, weight_matching

Params = dict[str, torch.Tensor]


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


# ---------------------------------------------------------------------- models


def mlp_init(width: int, depth: int, g: torch.Generator) -> Params:
    sizes = [64] + [width] * depth
    p: Params = {}
    for i in range(depth):
        fan_in = sizes[i]
        p[f"fc{i}.weight"] = torch.randn(sizes[i + 1], fan_in, generator=g) * math.sqrt(2 / fan_in)
        p[f"fc{i}.bias"] = torch.zeros(sizes[i + 1])
    p["out.weight"] = torch.randn(10, width, generator=g) / math.sqrt(width)
    p["out.bias"] = torch.zeros(10)
    return p


def mlp_forward(p: Params, x: torch.Tensor) -> torch.Tensor:
    i = 0
    while f"fc{i}.weight" in p:
        x = F.relu(F.linear(x, p[f"fc{i}.weight"], p[f"fc{i}.bias"]))
        i += 1
    return F.linear(x, p["out.weight"], p["out.bias"])


def mlp_spec(width: int, depth: int) -> PermSpec:
    """One group per hidden layer: rows of its weight and bias, columns of the next."""
    spec = PermSpec(sizes={f"h{i}": width for i in range(depth)})
    for i in range(depth):
        prev = Axis(f"h{i - 1}") if i > 0 else None
        spec.add(f"fc{i}.weight", (width, width if i else 64), (Axis(f"h{i}"), prev))
        spec.add(f"fc{i}.bias", (width,), (Axis(f"h{i}"),))
    spec.add("out.weight", (10, width), (None, Axis(f"h{depth - 1}")))
    return spec


TOKENS, PIXELS, HEADS, KV_HEADS, LAYERS = 8, 8, 4, 2, 2


def transformer_config(hidden: int) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": LAYERS,
    }


def transformer_init(hidden: int, g: torch.Generator) -> Params:
    hd = hidden // HEADS
    inter = 2 * hidden

    def lin(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) / math.sqrt(inp)

    # The token "embedding" is a (pixels, hidden) matrix applied to each row's pixels,
    # stored like a vocabulary embedding so that it has the same permutation role.
    p: Params = {
        "model.embed_tokens.weight": torch.randn(PIXELS, hidden, generator=g) * 0.3,
        "model.embed_positions.weight": torch.randn(TOKENS, hidden, generator=g) * 0.3,
    }
    for i in range(LAYERS):
        pre = f"model.layers.{i}."
        p[pre + "input_layernorm.weight"] = torch.ones(hidden)
        p[pre + "self_attn.q_proj.weight"] = lin(HEADS * hd, hidden)
        p[pre + "self_attn.k_proj.weight"] = lin(KV_HEADS * hd, hidden)
        p[pre + "self_attn.v_proj.weight"] = lin(KV_HEADS * hd, hidden)
        p[pre + "self_attn.o_proj.weight"] = lin(hidden, HEADS * hd) / math.sqrt(2 * LAYERS)
        p[pre + "post_attention_layernorm.weight"] = torch.ones(hidden)
        p[pre + "mlp.up_proj.weight"] = lin(inter, hidden)
        p[pre + "mlp.up_proj.bias"] = torch.zeros(inter)
        p[pre + "mlp.down_proj.weight"] = lin(hidden, inter) / math.sqrt(2 * LAYERS)
        p[pre + "mlp.down_proj.bias"] = torch.zeros(hidden)
    p["model.norm.weight"] = torch.ones(hidden)
    p["lm_head.weight"] = lin(10, hidden)
    return p


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def transformer_forward(p: Params, x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    h = x.view(b, TOKENS, PIXELS) @ p["model.embed_tokens.weight"]
    h = h + p["model.embed_positions.weight"]
    hidden = h.shape[-1]
    hd = hidden // HEADS
    for i in range(LAYERS):
        pre = f"model.layers.{i}."
        a = _rms(h, p[pre + "input_layernorm.weight"])
        q = F.linear(a, p[pre + "self_attn.q_proj.weight"]).view(b, TOKENS, HEADS, hd)
        k = F.linear(a, p[pre + "self_attn.k_proj.weight"]).view(b, TOKENS, KV_HEADS, hd)
        v = F.linear(a, p[pre + "self_attn.v_proj.weight"]).view(b, TOKENS, KV_HEADS, hd)
        # Query head j reads key/value head j // (HEADS / KV_HEADS), as in transformers.
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=2)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        h = h + F.linear(
            att.transpose(1, 2).reshape(b, TOKENS, hidden), p[pre + "self_attn.o_proj.weight"]
        )
        m = _rms(h, p[pre + "post_attention_layernorm.weight"])
        m = F.gelu(F.linear(m, p[pre + "mlp.up_proj.weight"], p[pre + "mlp.up_proj.bias"]))
        h = h + F.linear(m, p[pre + "mlp.down_proj.weight"], p[pre + "mlp.down_proj.bias"])
    return F.linear(_rms(h, p["model.norm.weight"]).mean(1), p["lm_head.weight"])


# ------------------------------------------------------------------- training


def train(forward, params: Params, data, *, seed: int, epochs: int, lr: float) -> Params:
    x, y = data[0], data[1]
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(y) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(forward(params, x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return {k: v.detach() for k, v in params.items()}


@torch.no_grad()
def loss_and_acc(forward, p: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = forward(p, x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


def barrier(forward, a: Params, b: Params, x, y, steps: int = 25) -> float:
    la, lb = loss_and_acc(forward, a, x, y)[0], loss_and_acc(forward, b, x, y)[0]
    worst = 0.0
    for alpha in torch.linspace(0, 1, steps).tolist():
        mid = {k: (1 - alpha) * a[k] + alpha * b[k] for k in a}
        lm = loss_and_acc(forward, mid, x, y)[0]
        worst = max(worst, lm - ((1 - alpha) * la + alpha * lb))
    return worst


@dataclass
class Row:
    model: str
    width: int
    params: int
    test_acc_a: float
    test_acc_b: float
    train_barrier_naive: float
    train_barrier_matched: float
    test_barrier_naive: float
    test_barrier_matched: float
    l2_naive: float
    l2_matched: float
    rounds: int
    match_seconds: float


def run_pair(name: str, width: int, forward, init, spec: PermSpec, data, epochs, lr) -> Row:
    xtr, ytr, xte, yte = data
    a = train(forward, init(0), data, seed=100, epochs=epochs, lr=lr)
    b = train(forward, init(1), data, seed=101, epochs=epochs, lr=lr)
    start = time.perf_counter()
    result = weight_matching(spec, DictSource(a), DictSource(b), seed=0)
    secs = time.perf_counter() - start
    b_matched = {
        k: permute(v, spec.axes[k], result.perms) if k in spec.axes else v for k, v in b.items()
    }
    # Same function after permuting: the matched B must classify exactly like B.
    same = torch.allclose(forward(b, xte), forward(b_matched, xte), atol=1e-4)
    assert same, "permutation changed the function"
    return Row(
        model=name,
        width=width,
        params=sum(v.numel() for v in a.values()),
        test_acc_a=loss_and_acc(forward, a, xte, yte)[1],
        test_acc_b=loss_and_acc(forward, b, xte, yte)[1],
        train_barrier_naive=barrier(forward, a, b, xtr, ytr),
        train_barrier_matched=barrier(forward, a, b_matched, xtr, ytr),
        test_barrier_naive=barrier(forward, a, b, xte, yte),
        test_barrier_matched=barrier(forward, a, b_matched, xte, yte),
        l2_naive=result.distance(result.objective_before),
        l2_matched=result.distance(result.objective_after),
        rounds=result.rounds,
        match_seconds=secs,
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| model | width | params | test acc A / B | train barrier naive → matched "
        "| test barrier naive → matched | rel. L2 naive → matched | rounds | match s |",
        "|---|---:|---:|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.width} | {r.params:,} | {r.test_acc_a:.3f} / {r.test_acc_b:.3f} "
            f"| {r.train_barrier_naive:.4f} → {r.train_barrier_matched:.4f} "
            f"| {r.test_barrier_naive:.4f} → {r.test_barrier_matched:.4f} "
            f"| {r.l2_naive:.3f} → {r.l2_matched:.3f} | {r.rounds} | {r.match_seconds:.2f} |"
        )
    return "\n".join(lines)


def _widths(text: str) -> list[int]:
    return [int(w) for w in text.split(",") if w.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mlp-widths", default="32,128,512,2048")
    ap.add_argument("--mlp-depth", type=int, default=3)
    ap.add_argument("--transformer-widths", default="32,64,128")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--transformer-lr", type=float, default=3e-3)
    ap.add_argument("--quick", action="store_true", help="small widths, few epochs")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.mlp_widths, args.transformer_widths, args.epochs = "32,128", "32", 5
    data = load_digits_split()
    rows = []
    for w in _widths(args.mlp_widths):
        depth = args.mlp_depth

        def init(seed: int, w=w, depth=depth) -> Params:
            return mlp_init(w, depth, torch.Generator().manual_seed(seed))

        rows.append(
            run_pair(
                f"MLP ×{depth}", w, mlp_forward, init, mlp_spec(w, depth), data, args.epochs, 1e-3
            )
        )
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    for w in _widths(args.transformer_widths):

        def tinit(seed: int, w=w) -> Params:
            return transformer_init(w, torch.Generator().manual_seed(seed))

        shapes = {k: tuple(v.shape) for k, v in tinit(0).items()}
        spec = transformer_spec(shapes, transformer_config(w))
        rows.append(
            run_pair(
                f"transformer ×{LAYERS}",
                w,
                transformer_forward,
                tinit,
                spec,
                data,
                args.epochs,
                args.transformer_lr,
            )
        )
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
