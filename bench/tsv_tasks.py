"""Merge small fine-tuned MLPs with task arithmetic, TIES, TSV-M and R-TSVM.

A shared MLP trunk is pre-trained on sklearn's digits, then fine-tuned (trunk and
head) on T different tasks: the same ten digits seen through a different input
transform each (flips, rotation, transposition, inversion, a checkerboard inversion).
Each task keeps its own fine-tuned head, as the heads of the TSV paper's vision
tasks; only the trunk is merged, by the registered weightops methods called directly.
λ is chosen per method on a validation split; the table reports test accuracy of
each task normalised to its own fine-tune, averaged over seeds.

    python bench/tsv_tasks.py            # writes docs/tsv.md's table to stdout
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from weightops.merge import get_method

TASKS = ("fliplr", "flipud", "rot90", "transpose", "invert", "checker")
LAMBDAS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.7, 2.0, 2.5, 3.0)
WIDTH = 128


def transform(x: np.ndarray, task: str) -> np.ndarray:
    img = x.reshape(-1, 8, 8)
    if task == "base":
        out = img
    elif task == "fliplr":
        out = img[:, :, ::-1]
    elif task == "flipud":
        out = img[:, ::-1, :]
    elif task == "rot90":
        out = np.rot90(img, 1, axes=(1, 2))
    elif task == "transpose":
        out = img.transpose(0, 2, 1)
    elif task == "invert":
        out = 1 - img
    elif task == "checker":
        mask = (np.add.outer(np.arange(8), np.arange(8)) % 2).astype(bool)
        out = np.where(mask, 1 - img, img)
    else:
        raise ValueError(task)
    return np.ascontiguousarray(out.reshape(-1, 64), dtype=np.float32)


def splits(seed: int):
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    parts = np.split(order, [n_train, n_train + n_val])
    return [(x[p], torch.from_numpy(y[p])) for p in parts]


def trunk() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, WIDTH),
        nn.GELU(),
        nn.Linear(WIDTH, WIDTH),
        nn.GELU(),
        nn.Linear(WIDTH, WIDTH),
        nn.GELU(),
    )


def train(body: nn.Module, head: nn.Module, x, y, epochs: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    params = [*body.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    x = torch.from_numpy(x)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = nn.functional.cross_entropy(head(body(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(body: nn.Module, head: nn.Module, x, y) -> float:
    return float((head(body(torch.from_numpy(x))).argmax(1) == y).float().mean())


def merged_state(method: str, base: dict, fts: list[dict], params: dict) -> dict:
    spec = get_method(method)
    out = {}
    for name, b in base.items():
        full = {p.name: p.default for p in spec.params.values()}
        full.update(weight=1.0, **params)
        for p in spec.params.values():
            if p.per_model:
                full[p.name] = [full[p.name]] * len(fts)
        out[name] = spec([ft[name].clone() for ft in fts], b.clone(), full, name=name)
    return out


def run_seed(
    seed: int,
    tasks: tuple[str, ...],
    methods: dict[str, tuple[str, dict]],
    ft_epochs: int,
    ft_lr: float,
):
    torch.manual_seed(seed)
    (xtr, ytr), (xva, yva), (xte, yte) = splits(seed)
    body, head = trunk(), nn.Linear(WIDTH, 10)
    train(body, head, transform(xtr, "base"), ytr, epochs=30, lr=1e-3, seed=seed)
    base = {k: v.clone() for k, v in body.state_dict().items()}
    fts, heads, ft_val, ft_test = [], [], [], []
    for i, task in enumerate(tasks):
        b, h = trunk(), nn.Linear(WIDTH, 10)
        b.load_state_dict(base)
        h.load_state_dict(head.state_dict())
        train(b, h, transform(xtr, task), ytr, epochs=ft_epochs, lr=ft_lr, seed=seed * 100 + i)
        fts.append({k: v.clone() for k, v in b.state_dict().items()})
        heads.append(h)
        ft_val.append(accuracy(b, h, transform(xva, task), yva))
        ft_test.append(accuracy(b, h, transform(xte, task), yte))
    probe = trunk()

    def scores(state: dict, x, y, ref) -> list[float]:
        probe.load_state_dict(state)
        return [
            accuracy(probe, h, transform(x, t), y) / r
            for t, h, r in zip(tasks, heads, ref, strict=True)
        ]

    rows = {"fine-tunes (reference)": [1.0] * len(tasks)}
    rows["base model"] = scores(base, xte, yte, ft_test)
    chosen = {}
    for label, (method, params) in methods.items():
        best = None
        for lam in LAMBDAS:
            state = merged_state(method, base, fts, {**params, "lambda": lam})
            val = float(np.mean(scores(state, xva, yva, ft_val)))
            if best is None or val > best[0]:
                best = (val, lam, state)
        rows[label] = scores(best[2], xte, yte, ft_test)
        chosen[label] = best[1]
    stats = task_vector_stats(base, fts)
    return rows, chosen, ft_test, stats


def task_vector_stats(base: dict, fts: list[dict]) -> dict:
    """Kurtosis of the matrices' task-vector entries and their effective rank share."""
    kurt, rank90 = [], []
    for name, b in base.items():
        if b.dim() != 2:
            continue
        for ft in fts:
            d = (ft[name] - b).double()
            z = (d - d.mean()) / d.std()
            kurt.append(float((z**4).mean()))
            s2 = torch.linalg.svdvals(d) ** 2
            share = torch.cumsum(s2, 0) / s2.sum()
            rank90.append(int((share < 0.9).sum()) + 1)
    return {"kurtosis": float(np.mean(kurt)), "rank90": float(np.mean(rank90))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=len(TASKS))
    parser.add_argument("--ft-epochs", type=int, default=15)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = TASKS[: args.tasks]
    methods = {
        "task_arithmetic": ("task_arithmetic", {}),
        "ties (density 0.2)": ("ties", {"density": 0.2}),
        "tsv_m": ("tsv_m", {"svd": "full"}),
        "r_tsvm: damping only": ("r_tsvm", {"svd": "full", "energy": 0.0}),
        "r_tsvm: rank selection only": ("r_tsvm", {"svd": "full", "outlier_z": 0.0}),
        "r_tsvm (both)": ("r_tsvm", {"svd": "full"}),
    }
    start = time.perf_counter()
    per_seed, lambdas, stats = [], {k: [] for k in methods}, []
    for seed in range(args.seeds):
        rows, chosen, ft_test, st = run_seed(seed, tasks, methods, args.ft_epochs, args.ft_lr)
        per_seed.append(rows)
        stats.append(st)
        for k, v in chosen.items():
            lambdas[k].append(v)
        print(f"seed {seed}: fine-tune test accuracy {np.round(ft_test, 3).tolist()}", flush=True)
    labels = list(per_seed[0])
    header = "| method | λ (per seed) | " + " | ".join(tasks) + " | mean |"
    lines = [header, "|" + "---|" * (len(tasks) + 3)]
    for label in labels:
        table = np.array([s[label] for s in per_seed]) * 100  # seeds × tasks
        per_task = table.mean(0)
        mean = table.mean(1)
        lam = ", ".join(f"{x:g}" for x in lambdas.get(label, [])) or "—"
        cells = " | ".join(f"{v:.1f}" for v in per_task)
        lines.append(f"| {label} | {lam} | {cells} | {mean.mean():.1f} ± {mean.std(ddof=1):.1f} |")
    print("\n".join(lines))
    kurt = np.mean([s["kurtosis"] for s in stats])
    rank = np.mean([s["rank90"] for s in stats])
    print(
        f"\ntask matrices: mean kurtosis {kurt:.1f} (Gaussian: 3), mean rank holding 90% "
        f"of the energy {rank:.1f}; {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
