"""Baking steering into weights, so a plain checkpoint serves the steered model.

- Addition at all positions: adding s·dᵢ to the output of block i equals adding it to
  the bias of the block's last residual writer (the MLP's output projection). Existing
  biases are shifted (GPT-2, GPT-NeoX); Llama-family checkpoints get `mlp_bias: true`
  in their config and zero biases for the other MLP projections. Families whose MLP
  output passes through a norm first, or whose code has no bias to switch on, are
  refused: use hooks there.
- Directional ablation: every matrix that writes to the residual stream is
  orthogonalised against the direction r̂: W ← W − r̂ r̂ᵀ W for a linear layer's output
  rows (and its bias), the rows of the token and position embeddings, and GPT-2's
  Conv1D outputs. With tied embeddings the shared matrix also serves as lm_head, which
  then reads the projected stream, exactly as the hooked model does.
- An optimized intervention (`bake_point`, from `steer optimize`): a weighted ablation
  of the attention and MLP output projections, a weight per layer and kind, or an
  addition with a strength per layer.

Both stream the checkpoint tensor by tensor through the atomic writer; the model is
never loaded whole.
"""

from __future__ import annotations

from pathlib import Path

import torch

from weightops.arch import describe, family, num_layers, text_config, tied_lm_head_name
from weightops.io.checkpoint import Checkpoint
from weightops.io.rewrite import rewrite_checkpoint
from weightops.steering.hooks import ablation_basis
from weightops.steering.layers import POST_NORM_FAMILIES, SteeringError
from weightops.steering.profile import Directions, Point, ablate
from weightops.steering.vector import SteeringVector, _check_strength

_BIAS_BY_CONFIG = {"llama": "mlp_bias"}
_HAS_BIAS = ("gpt2", "gpt_neox")
# Families whose residual writers store (in, out) matrices (Conv1D).
_CONV1D = ("gpt2",)


def _check_model(vec: SteeringVector, ckpt: Checkpoint) -> str:
    cfg = text_config(ckpt.config)
    model_type = family(ckpt.config)
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    depth = num_layers(ckpt.config, ckpt.tensors)
    if vec.hidden_size != hidden:
        raise SteeringError(
            f"vector has hidden size {vec.hidden_size} but {ckpt.path} has {hidden}"
        )
    if vec.model_type not in (model_type, "unknown", ""):
        raise SteeringError(
            f"vector was read from a {vec.model_type} model, but {ckpt.path} is {model_type}"
        )
    bad = [i for i in vec.layers if not 0 <= i < depth]
    if bad:
        raise SteeringError(
            f"vector has layers {bad} but {ckpt.path} has {depth} (0 … {depth - 1})"
        )
    if model_type in POST_NORM_FAMILIES:
        raise SteeringError(
            f"{model_type} normalises each sublayer's output before the residual stream, so "
            "steering cannot be baked into its weights",
            hint="apply the vector with hooks (SteeringVector.apply) instead",
        )
    return model_type


def bake_addition(
    model: str | Path,
    vec: SteeringVector,
    strength: float,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    shard_size: int = 5 * 10**9,
) -> Path:
    """Write `model` with `strength · vec` added to every block output it names; the
    floating-point tensors in `dtype` (default: the source's)."""
    _check_strength(strength)
    ckpt = Checkpoint(model)
    model_type = _check_model(vec, ckpt)
    down = {
        describe(n).layer: n
        for n in ckpt.tensors
        if describe(n).role == "mlp_down" and n.endswith(".weight")
    }
    new: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    updates = {}
    if model_type in _BIAS_BY_CONFIG and not ckpt.config.get(_BIAS_BY_CONFIG[model_type]):
        # Switching the flag on gives every MLP projection a bias: zeros except ours.
        updates[_BIAS_BY_CONFIG[model_type]] = True
        for name, info in ckpt.tensors.items():
            if describe(name).role in ("mlp_gate", "mlp_up", "mlp_down") and name.endswith(
                ".weight"
            ):
                new[name[: -len("weight")] + "bias"] = ((info.shape[0],), info.dtype)
    elif model_type not in _HAS_BIAS and model_type not in _BIAS_BY_CONFIG:
        raise SteeringError(
            f"{model_type} has no bias on its MLP output projection and no config switch for one",
            hint="apply the vector with hooks (SteeringVector.apply) instead",
        )
    shifts = {down[i][: -len("weight")] + "bias": strength * d for i, d in vec.directions.items()}

    def transform(name: str, tensor: torch.Tensor | None) -> torch.Tensor:
        if tensor is None:
            tensor = torch.zeros(new[name][0], dtype=torch.float32)
        if name in shifts:
            return tensor.float() + shifts[name]
        return tensor

    settings = {
        "job": "steer bake",
        "strength": strength,
        "layers": vec.layers,
        "method": vec.method,
        "model_type": vec.model_type,
    }
    summary = [
        f"Steering vector ({vec.method or 'given'}) baked in as an addition of strength "
        f"{strength} to the outputs of blocks {vec.layers}, through MLP output biases."
    ]
    return rewrite_checkpoint(
        ckpt,
        Path(out),
        transform,
        new_tensors=new,
        config_updates=updates,
        title=f"{ckpt.path.name} + steering",
        summary=summary,
        settings=settings,
        tag="steering",
        dtype=dtype,
        force=force,
        shard_size=shard_size,
    )


def bake_ablation(
    model: str | Path,
    vec: SteeringVector,
    out: str | Path,
    *,
    layer: int | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    shard_size: int = 5 * 10**9,
) -> Path:
    """Write `model` with the vector's direction projected out of every residual write;
    the floating-point tensors in `dtype` (default: the source's)."""
    ckpt = Checkpoint(model)
    model_type = _check_model(vec, ckpt)
    q = ablation_basis([(vec, 1.0)], layer).double()
    conv1d = model_type in _CONV1D
    tied = tied_lm_head_name(ckpt.tensors, ckpt.config) is not None

    def transform(name: str, tensor: torch.Tensor | None) -> torch.Tensor:
        role = describe(name).role
        if role in ("embed", "pos_embed"):
            return _project_last(tensor, q)
        if role in ("attn_o", "mlp_down"):
            if name.endswith(".bias") or conv1d:
                return _project_last(tensor, q)
            return _project_first(tensor, q)
        return tensor

    settings = {
        "job": "steer ablate",
        "layer": layer,
        "layers": vec.layers,
        "method": vec.method,
        "model_type": vec.model_type,
        "tied_embeddings": tied,
    }
    summary = [
        "Directional ablation baked in: every matrix writing to the residual stream "
        "(embeddings, attention and MLP outputs) is orthogonalised against the vector's direction"
        + (" (the tied lm_head shares the embedding)." if tied else ".")
    ]
    return rewrite_checkpoint(
        ckpt,
        Path(out),
        transform,
        title=f"{ckpt.path.name} − direction",
        summary=summary,
        settings=settings,
        tag="steering",
        dtype=dtype,
        force=force,
        shard_size=shard_size,
    )


def _project_last(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Remove span(q) from the last axis (rows of an embedding, Conv1D outputs, biases)."""
    x = t.double()
    return x - (x @ q) @ q.T  # the writer rounds once, to the output dtype


def _project_first(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Remove span(q) from the first axis (a Linear weight's output rows)."""
    x = t.double()
    return x - q @ (q.T @ x)


def bake_point(
    model: str | Path,
    point: Point,
    directions: Directions,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    shard_size: int = 5 * 10**9,
) -> Path:
    """Write `model` with an optimized intervention (steering.profile) baked in: in
    mode "remove" each attention and MLP output projection of block i becomes
    W − λ r̂ r̂ᵀ W with its own weight λ; in mode "add" the per-layer additions go into
    MLP output biases as in `bake_addition`."""
    ckpt = Checkpoint(model)
    cfg = text_config(ckpt.config)
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    depth = num_layers(ckpt.config, ckpt.tensors)
    if depth != directions.depth or hidden != directions.target_mean.shape[1]:
        raise SteeringError(
            f"the directions are for {directions.depth} layers of width "
            f"{directions.target_mean.shape[1]}, but {ckpt.path} has {depth} of {hidden}"
        )
    dirs = directions.for_point(point)
    weights = point.weights(depth)
    model_type = family(ckpt.config)
    if point.mode == "add":
        vec = SteeringVector(
            {i: weights[(i, "mlp")] * dirs[i] for i, _ in weights},
            model_type=model_type,
            hidden_size=hidden,
            method="optimize",
        )
        return bake_addition(model, vec, 1.0, out, dtype=dtype, force=force, shard_size=shard_size)
    vec = SteeringVector(dirs, model_type=model_type, hidden_size=hidden, method="optimize")
    _check_model(vec, ckpt)
    conv1d = model_type in _CONV1D
    component = {"attn_o": "attn", "mlp_down": "mlp"}

    def transform(name: str, tensor: torch.Tensor | None) -> torch.Tensor:
        d = describe(name)
        lam = weights.get((d.layer, component.get(d.role, "")))
        if not lam:
            return tensor
        rows_out = name.endswith(".bias") or conv1d
        return ablate(tensor, dirs[d.layer], lam, rows_out=rows_out, keep_norms=point.norms)

    settings = {"job": "steer optimize", "point": point.as_dict()}
    summary = [
        "Weighted directional ablation baked in: each attention and MLP output projection "
        "of the blocks listed in the settings is W − λ r̂ r̂ᵀ W, its weight λ and direction "
        "r̂ found by `weightops steer optimize`"
        + (", each row scaled back to its original norm." if point.norms else ".")
    ]
    return rewrite_checkpoint(
        ckpt,
        Path(out),
        transform,
        title=f"{ckpt.path.name} − weighted direction",
        summary=summary,
        settings=settings,
        tag="steering",
        dtype=dtype,
        force=force,
        shard_size=shard_size,
    )
