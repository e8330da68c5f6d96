"""Read a codebook-features (the reference implementation, 0.1.2) checkpoint: config and tensors.

A checkpoint is what the reference's ``CodebookModel.save_pretrained`` writes: ``config.json``
(``model_type: "codebook"``) and the whole wrapped model's state dict as ``model.safetensors`` or
``pytorch_model.bin`` (optionally sharded with an ``*.index.json``). Pickles are read with
``torch.load(weights_only=True)`` only, never fully unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from codebook_lens.errors import CheckpointError
from codebook_lens.hub import resolve_dir

__all__ = ["ReferenceCheckpoint", "read_reference_checkpoint", "REFERENCE_FILES"]

REFERENCE_FILES = ["*.json", "*.safetensors", "*.bin", "fsm.npy"]
"""Hub file patterns of a reference checkpoint (config, weights, a TokFSM ``fsm.npy``)."""


@dataclass
class ReferenceCheckpoint:
    """A reference checkpoint as read from disk."""

    path: Path
    """The directory it was read from (a Hub cache snapshot for Hub ids)."""

    config: dict[str, Any]
    """Its ``config.json`` (a ``CodebookModelConfig``)."""

    state_dict: dict[str, Tensor]
    """Every tensor of the wrapped model, keys as saved (``model.transformer.h.0....``)."""


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(
            f"{path} has no config.json; it is not a codebook-features checkpoint"
        )
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or cfg.get("model_type") != "codebook":
        raise CheckpointError(
            f"{file} has model_type {cfg.get('model_type') if isinstance(cfg, dict) else None!r}"
            "; a codebook-features checkpoint has model_type 'codebook'"
        )
    return cfg


def _load_one(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from e
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file} holds objects other than tensors, which are not loaded (only "
            f"torch.load(weights_only=True) is used, never full unpickling): {e}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable PyTorch state dict ({e})") from e
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()
    ):
        raise CheckpointError(f"{file} is not a state dict of named tensors")
    return sd


def _weight_files(path: Path) -> list[Path]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
        index = path / f"{name}.index.json"
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e})") from e
            return [path / s for s in shards]
    raise CheckpointError(
        f"{path} has no model.safetensors or pytorch_model.bin (nor a sharded index of either)"
    )


def read_reference_checkpoint(
    src: str | os.PathLike, revision: str | None = None
) -> ReferenceCheckpoint:
    """Read a codebook-features checkpoint from a directory or a Hub repo id."""
    path = resolve_dir(src, revision, REFERENCE_FILES)
    config = _read_config(path)
    sd: dict[str, Tensor] = {}
    for file in _weight_files(path):
        if not file.exists():
            raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
        sd.update(_load_one(file))
    return ReferenceCheckpoint(path, config, sd)
