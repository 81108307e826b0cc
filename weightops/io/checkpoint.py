"""A Hugging Face checkpoint on disk: a folder (one file or a sharded index) or one file.

Opening a checkpoint reads headers only. Tensors are read one at a time on demand.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from weightops.arch import embedding_name, tied_lm_head_name
from weightops.errors import CheckpointError
from weightops.io.safe_read import Stamp, file_stamp, is_regular, load_json
from weightops.io.safetensors_file import TensorInfo, read_header
from weightops.io.sidefiles import TOKENIZER_FILES

INDEX_NAME = "model.safetensors.index.json"
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_CONVERT_HINT = (
    "weightops reads safetensors only, because pickled checkpoints can run arbitrary code; "
    "convert it once in a trusted environment: "
    "AutoModelForCausalLM.from_pretrained(PATH).save_pretrained(NEW_PATH, safe_serialization=True)"
)


class Checkpoint:
    """Tensor names, shapes and dtypes of a checkpoint, and where each one lives."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files, self.index_path = _locate(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        weight_map = _read_index(self.index_path) if self.index_path else None
        # What each input file was when its header was read: a run checks them again
        # at its end, so a shard replaced or rewritten mid-run fails it.
        self.stamps: dict[Path, Stamp | None] = {}
        for file in self.files:
            self.stamps[file] = file_stamp(file)
            infos, meta = read_header(file)
            self.metadata.update(meta)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is stored in both "
                        f"{self.tensors[name].path.name} and {file.name}"
                    )
                self.tensors[name] = info
        if weight_map is not None:
            _check_index(self.index_path, weight_map, self.tensors)
        if not self.tensors:
            raise CheckpointError(
                f"{self.path}: the checkpoint holds no tensors",
                hint="the weights are missing or the file is truncated; download it again",
            )
        _check_side_files(self.folder)
        self.aliases: dict[str, str] = {}
        tied = tied_lm_head_name(self.tensors.keys(), self.config)
        if tied is not None:
            self.aliases[tied] = embedding_name(self.tensors.keys())  # type: ignore[assignment]

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @cached_property
    def config(self) -> dict[str, Any]:
        """config.json as a dict ({} for a bare file without one)."""
        cfg = self.folder / "config.json"
        if not cfg.exists() and not cfg.is_symlink():
            return {}
        config = load_json(cfg, "config.json")
        _check_config(cfg, config)
        return config

    def changed_files(self) -> list[Path]:
        """Input files that are not what they were when the checkpoint was opened."""
        return [f for f, stamp in self.stamps.items() if file_stamp(f) != stamp]

    def info(self, name: str) -> TensorInfo | None:
        """The stored tensor for `name`, following a tied lm_head to the embedding."""
        info = self.tensors.get(name)
        if info is None and name in self.aliases:
            info = self.tensors.get(self.aliases[name])
        return info

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"


# The config keys weightops reads, and their JSON types; anything else passes through.
_INT_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "hidden_size",
    "n_embd",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
    "max_position_embeddings",
)


def _check_config(path: Path, config: dict[str, Any], where: str = "") -> None:
    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: {where}{key!r} must be {want}, not {config[key]!r:.60}",
            hint="the config is corrupted; restore it from the model's original files",
        )

    for key in _INT_KEYS:
        value = config.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31
        ):
            raise bad(key, "a whole number")
    for key in ("model_type", "_name_or_path"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise bad(key, "a string")
    if "architectures" in config and not (
        config["architectures"] is None
        or (
            isinstance(config["architectures"], list)
            and all(isinstance(a, str) for a in config["architectures"])
        )
    ):
        raise bad("architectures", "a list of class names")
    if "tie_word_embeddings" in config and not isinstance(config["tie_word_embeddings"], bool):
        raise bad("tie_word_embeddings", "true or false")
    if "layer_types" in config and not isinstance(config["layer_types"], (list, type(None))):
        raise bad("layer_types", "a list")
    if "text_config" in config and not where:
        inner = config["text_config"]
        if inner is not None and not isinstance(inner, dict):
            raise bad("text_config", "an object")
        if inner:
            _check_config(path, inner, "text_config.")


def _check_side_files(folder: Path) -> None:
    """Refuse a side file that is a pipe, device or folder: transformers would open it
    when the model is loaded, and block or fail there."""
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        path = folder / name
        if os.path.lexists(path) and not is_regular(path):
            raise CheckpointError(
                f"{path}: is not a regular file", hint="replace it with the file itself"
            )


def _locate(path: Path) -> tuple[list[Path], Path | None]:
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such model folder or file",
            hint="weightops reads local checkpoints; check the path, or download the model first "
            "(huggingface-cli download REPO --local-dir PATH)",
        )
    if not path.is_dir():
        if path.suffix != ".safetensors":
            if any(path.match(p) for p in _PICKLED):
                raise CheckpointError(f"{path}: pickled checkpoint refused", hint=_CONVERT_HINT)
            raise CheckpointError(f"{path}: not a .safetensors file")
        return [path], None
    index = path / INDEX_NAME
    if index.exists() or index.is_symlink():
        return _index_files(index), index
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, None
    if any(path.glob(p) for p in _PICKLED):
        raise CheckpointError(f"{path}: only pickled (.bin/.pt) weights found", hint=_CONVERT_HINT)
    raise CheckpointError(
        f"{path}: no .safetensors weights in this folder",
        hint="point at a Hugging Face model folder or a .safetensors file",
    )


def _read_index(index: Path) -> dict[str, str]:
    data = load_json(index, "the safetensors index")
    weight_map = data.get("weight_map")
    hint = "re-save the model or delete the index if the folder holds a single file"
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: not a valid safetensors index (needs a non-empty 'weight_map' object)",
            hint=hint,
        )
    for name, file in weight_map.items():
        # A shard is a file in the model folder: never a path that leads out of it.
        if not (
            isinstance(file, str)
            and file.endswith(".safetensors")
            and Path(file).name == file
            and file not in (".", "..")
        ):
            raise CheckpointError(
                f"{index}: weight_map gives tensor {name[:80]!r} the shard {str(file)[:80]!r}, "
                "which is not a .safetensors file name in this folder",
                hint=hint,
            )
    return weight_map


def _index_files(index: Path) -> list[Path]:
    files = []
    for name in dict.fromkeys(_read_index(index).values()):
        file = index.parent / name
        if not file.exists():
            raise CheckpointError(
                f"{index}: lists shard {name} which does not exist",
                hint="the download is incomplete; fetch the missing shard",
            )
        files.append(file)
    return files


def _check_index(
    index: Path | None, weight_map: dict[str, str], found: dict[str, TensorInfo]
) -> None:
    for name, file in weight_map.items():
        info = found.get(name)
        if info is None or info.path.name != file:
            raise CheckpointError(
                f"{index}: says tensor {name!r} is in {file}, but it is not there",
                hint="the index does not match the shards; re-save the model",
            )
