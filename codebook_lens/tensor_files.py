"""Safetensors files: read with errors that name the file, write with shared storage untied, and
check loaded tensors against what their config says (:func:`check_tensor`; a codebook's whole
state: :meth:`codebook_lens.quantizer.Codebook.checked_state`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from codebook_lens.errors import CheckpointError

__all__ = ["read_tensors", "write_tensors", "untie", "check_tensor"]


def read_tensors(file: Path, fix: str = "") -> dict[str, Tensor]:
    """Every tensor in safetensors ``file`` (on the CPU); ``CheckpointError`` naming the file
    (and ``fix``, what to do about it) when it is missing or unreadable. Never unpickles."""
    hint = f"; {fix}" if fix else ""
    if not file.exists():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete{hint}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}){hint}") from e


def untie(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies safetensors can write: a tensor sharing storage with an
    earlier one (tied embeddings) is cloned; empty tensors share no storage."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen and ptr != -1 else v
        seen.add(ptr)
    return out


def write_tensors(tensors: dict[str, Tensor], file: Path, fmt: str) -> None:
    """Write ``tensors`` (untied) to safetensors ``file`` with ``{"format": fmt}`` metadata.
    Not atomic by itself: call it inside :func:`codebook_lens.atomic.save_dir`."""
    save_file(untie(tensors), str(file), metadata={"format": fmt})


def _is_int(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def check_tensor(
    t: Tensor,
    name: str,
    file: Path | str,
    shape: tuple[int | None, ...] | None,
    kind: Literal["float", "count", "int"],
) -> Tensor:
    """``t`` if it has ``shape`` (``None`` for any shape; a ``None`` axis has any size) and is
    a finite ``kind`` tensor (``"float"``: floating point; ``"count"``: integer or floating,
    >= 0; ``"int"``: integer), else a CheckpointError naming ``name`` in ``file`` (a path, or
    words naming where the tensor comes from)."""
    ok = {
        "float": t.is_floating_point(),
        "count": t.is_floating_point() or _is_int(t),
        "int": _is_int(t),
    }[kind]
    if not ok:
        raise CheckpointError(f"{file}: {name} has dtype {t.dtype}; expected a {kind} tensor")
    if shape is not None and (
        t.dim() != len(shape) or any(w is not None and n != w for n, w in zip(t.shape, shape))
    ):
        want = str(tuple(shape)).replace("None", "any")
        raise CheckpointError(
            f"{file}: {name} has shape {tuple(t.shape)}, but its config says {want}"
        )
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(
            f"{file}: {name} holds NaN or inf values; the checkpoint was saved from a diverged "
            "model. Load an earlier checkpoint"
        )
    if kind == "count" and t.numel() and bool((t < 0).any()):
        raise CheckpointError(f"{file}: {name} holds negative counts; the checkpoint is corrupt")
    return t
