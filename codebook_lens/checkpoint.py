"""Training checkpoints for :func:`~codebook_lens.training.train_codebooks`: save and resume.

A checkpoint is a directory ``<checkpoint_dir>/checkpoint`` holding

* ``state.safetensors``: base-model weights (unless the model is frozen), codebooks with their
  usage counters and recent activations, optimizer tensors (AdamW moments and step counts),
  metric accumulators and the RNG state;
* ``state.json``: format marker, optimizer step, micro-batches consumed, optimizer
  hyperparameters, training history and the config it was written with.

It is written into a temporary directory that then replaces the previous checkpoint
(``os.replace``), so an interrupted run always finds a whole checkpoint and loses at most the
steps since it. No pickle: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from codebook_lens.io import CheckpointError, atomic_write_dir

__all__ = [
    "TrainState",
    "save_train_state",
    "load_train_state",
    "restore_rng",
    "checkpoint_path",
    "CKPT_FORMAT",
]

CKPT_FORMAT = "codebook_lens.train_state"
_VERSION = 1


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model and optimizer objects."""

    step: int = 0
    """Optimizer steps completed."""

    consumed: int = 0
    """Batches taken from the data iterable (micro-batches, counted once per global batch)."""

    history: list[dict[str, float]] = field(default_factory=list)
    """Logged rows so far."""

    evals: list[dict[str, float]] = field(default_factory=list)
    """``eval_fn`` results so far."""

    seconds: float = 0.0
    """Wall time spent in the loop before this checkpoint."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    """Loop-internal tensors (metric accumulators, usage counts at the last log)."""

    scalars: dict[str, Any] = field(default_factory=dict)
    """Loop-internal JSON values (e.g. how many micro-batches the accumulators hold)."""

    rng: dict[str, Tensor] = field(default_factory=dict)
    """Saved RNG states (``"cpu"``, ``"cuda.<i>"``); see :func:`restore_rng`."""


def checkpoint_path(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint directory inside ``checkpoint_dir``."""
    return Path(checkpoint_dir) / "checkpoint"


def _untie(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen and ptr != -1 else v
        seen.add(ptr)
    return out


def _rng_tensors() -> dict[str, Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def save_train_state(
    checkpoint_dir: str | os.PathLike[str],
    cm: Any,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config: dict[str, Any],
    include_model: bool = True,
) -> Path:
    """Write a checkpoint of ``cm`` (a CodebookModel), ``optimizer`` and ``state`` atomically.

    ``include_model=False`` leaves out the base model's weights (when it is frozen they never
    change). Returns the checkpoint directory.
    """
    tensors: dict[str, Tensor] = {}
    if include_model:
        for k, v in cm.model.state_dict().items():
            tensors[f"model.{k}"] = v
    for site, cb in cm.codebooks.items():
        tensors[f"cb.{site}.codebook"] = cb.codebook
        tensors[f"cb.{site}.code_counts"] = cb.code_counts
        tensors[f"cb.{site}.window_counts"] = cb.window_counts
        if cb.recent is not None:
            tensors[f"cb.{site}.recent"] = cb.recent
    sd = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"opt.{idx}.{key}"] = val
            else:
                opt_scalars.setdefault(str(idx), {})[key] = val
    for k, v in state.tensors.items():
        tensors[f"loop.{k}"] = v
    tensors.update(_rng_tensors())
    meta = {
        "format": CKPT_FORMAT,
        "version": _VERSION,
        "step": state.step,
        "consumed": state.consumed,
        "seconds": state.seconds,
        "history": state.history,
        "evals": state.evals,
        "scalars": state.scalars,
        "include_model": include_model,
        "sites": list(cm.codebooks),
        "optimizer": {"param_groups": sd["param_groups"], "scalars": opt_scalars},
        "config": config,
    }
    text = json.dumps(meta, indent=1)
    path = checkpoint_path(checkpoint_dir)
    with atomic_write_dir(path) as tmp:
        save_file(_untie(tensors), str(tmp / "state.safetensors"), metadata={"format": CKPT_FORMAT})
        (tmp / "state.json").write_text(text)
    return path


def load_train_state(
    checkpoint_dir: str | os.PathLike[str],
    cm: Any,
    optimizer: torch.optim.Optimizer,
    set_rng: bool = True,
) -> TrainState | None:
    """Restore ``cm`` and ``optimizer`` from the checkpoint in ``checkpoint_dir``.

    Returns the loop state, or None when there is no checkpoint yet. Raises
    :class:`~codebook_lens.CheckpointError` on a corrupt checkpoint or one from another model.
    """
    path = checkpoint_path(checkpoint_dir)
    if not (path / "state.json").exists():
        return None
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({e}); delete it to restart") from e
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a codebook_lens training checkpoint")
    if sorted(meta["sites"]) != sorted(cm.codebooks):
        raise CheckpointError(
            f"checkpoint {path} has codebooks at {meta['sites']} but the model has them at "
            f"{list(cm.codebooks)}; use a fresh checkpoint_dir for a different setup"
        )
    device = next(cm.parameters()).device
    with torch.no_grad():
        if meta["include_model"]:
            sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
            try:
                cm.model.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from e
        for site, cb in cm.codebooks.items():
            w = tensors[f"cb.{site}.codebook"]
            if w.shape != cb.codebook.shape:
                raise CheckpointError(
                    f"checkpoint codebook at {site} has shape {tuple(w.shape)}, the model's has "
                    f"{tuple(cb.codebook.shape)}"
                )
            cb.codebook.copy_(w)
            cb.code_counts.copy_(tensors[f"cb.{site}.code_counts"])
            cb.window_counts.copy_(tensors[f"cb.{site}.window_counts"])
            r = tensors.get(f"cb.{site}.recent")
            cb.recent = r.to(device) if r is not None else None
    opt_meta = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    for idx, extra in opt_meta["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state in {path} does not fit: {e}") from e
    out = TrainState(
        step=int(meta["step"]),
        consumed=int(meta["consumed"]),
        history=meta["history"],
        evals=meta["evals"],
        seconds=float(meta["seconds"]),
        tensors={k[5:]: v for k, v in tensors.items() if k.startswith("loop.")},
        scalars=meta["scalars"],
        rng={k[4:]: v for k, v in tensors.items() if k.startswith("rng.")},
    )
    if set_rng:
        restore_rng(out)
    return out


def restore_rng(state: TrainState) -> None:
    """Set the global CPU (and, when the device count matches, CUDA) RNG to ``state.rng``."""
    if "cpu" in state.rng:
        torch.set_rng_state(state.rng["cpu"])
    cuda = [state.rng[k] for k in sorted(state.rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
