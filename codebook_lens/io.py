"""Save and load codebook models: ``cfg.json`` plus safetensors, written atomically, no pickle.

Layout of a saved directory::

    cfg.json                 format marker, library version, backend, sites and their configs
    codebooks.safetensors    "<site>.codebook" [n_groups, n_codes, d_in], "<site>.code_counts",
                             "<site>.ln_weight", "<site>.ln_bias" [n_groups, d_in] (affine norm)
    model.safetensors        (include_model=True) the base model's state dict
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from codebook_lens.backends import (
    HF_DIR,
    BackendError,
    load_weights,
    model_spec,
    rebuild_model,
    resolve_backend,
    write_hf_config,
)
from codebook_lens.config import CodebookConfig
from codebook_lens.quantizer import Codebook

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_write_dir",
    "atomic_write_text",
    "save_codebook_model",
    "load_base_model",
    "load_codebook_model",
]

FORMAT = "codebook_lens"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A saved directory is missing, corrupt, foreign, or does not fit the model given."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class atomic_write_dir:
    """Context manager yielding a temporary directory that replaces ``path`` on success.

    On an exception the temporary directory is deleted and ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}."))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_codebook_model(cm: Any, path: str | os.PathLike, include_model: bool = False) -> None:
    """Save a :class:`CodebookModel` to directory ``path`` (replaced atomically)."""
    from codebook_lens import __version__

    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "backend": cm.backend,
        "sites": [{"site": s, "config": cb.cfg.to_dict()} for s, cb in cm.codebooks.items()],
        "model": model_spec(cm.model) if include_model else None,
    }
    tensors = {}
    for site, cb in cm.codebooks.items():
        tensors[f"{site}.codebook"] = cb.codebook.detach().contiguous().cpu()
        tensors[f"{site}.code_counts"] = cb.code_counts.detach().contiguous().cpu()
        for name, t in cb.extra_tensors().items():  # e.g. the affine input LayerNorm
            tensors[f"{site}.{name}"] = t.detach().contiguous().cpu()
    with atomic_write_dir(path) as tmp:
        save_file(tensors, str(tmp / "codebooks.safetensors"), metadata={"format": FORMAT})
        if include_model:
            if meta["model"]["source"] == "hf":
                write_hf_config(cm.model, tmp / HF_DIR)
            sd = {k: v.detach().contiguous().cpu() for k, v in cm.model.state_dict().items()}
            save_file(_untie(sd), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "cfg.json").write_text(json.dumps(meta, indent=2))


def _untie(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; copy tensors that alias another."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _read_meta(path: Path) -> dict[str, Any]:
    cfg_path = path / "cfg.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory saved by CodebookModel.save")
    if not cfg_path.exists():
        raise CheckpointError(f"{path} has no cfg.json; it was not written by CodebookModel.save")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{cfg_path} is not valid JSON ({e}); the checkpoint is corrupt"
        ) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not a codebook_lens checkpoint (no format marker)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses format version {meta['format_version']}; this codebook_lens reads "
            f"up to {FORMAT_VERSION}. Upgrade codebook_lens."
        )
    return meta


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.exists():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from e


def load_base_model(path: str | os.PathLike, backend: str = "auto") -> nn.Module:
    """The base model saved in ``path`` with ``include_model=True``, on ``backend``.

    A native model saved on either transformer-lens generation loads on the other (weights are
    translated between the ``HookedTransformer`` and bridge layouts); a Hugging Face-booted
    bridge is booted again from its saved config with its saved weights. The saved config is
    data: tokenizer names and ``trust_remote_code`` in it are ignored.
    """
    resolve_backend(backend)  # an argument error, before any file is read
    path = Path(path)
    meta = _read_meta(path)
    spec = meta.get("model")
    if not spec:
        raise CheckpointError(
            f"{path} was saved without the base model; pass it: "
            "CodebookModel.load(path, model), or save with include_model=True"
        )
    sd = _load_tensors(path / "model.safetensors")
    try:
        model = rebuild_model(spec, path, backend)
        load_weights(model, sd, spec)
    except (BackendError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot rebuild the base model saved in {path}: {e}") from e
    return model.eval()


def load_codebook_model(
    path: str | os.PathLike, model: nn.Module | None = None, backend: str = "auto"
) -> Any:
    """Rebuild a saved :class:`CodebookModel` on ``model`` (or the saved base model, on
    ``backend``)."""
    from codebook_lens.model import CodebookModel

    path = Path(path)
    meta = _read_meta(path)
    if model is None:
        model = load_base_model(path, backend)
    tensors = _load_tensors(path / "codebooks.safetensors")
    cm = CodebookModel(model)
    for entry in meta["sites"]:
        site = entry["site"]
        cfg = CodebookConfig.from_dict(entry["config"])
        key = f"{site}.codebook"
        if key not in tensors:
            raise CheckpointError(f"codebooks.safetensors has no tensor {key!r}")
        w = tensors[key]
        if tuple(w.shape) != (cfg.n_groups, cfg.n_codes, cfg.d_in):
            raise CheckpointError(
                f"{key} has shape {tuple(w.shape)}, but its config says "
                f"{(cfg.n_groups, cfg.n_codes, cfg.d_in)}"
            )
        try:
            cb = cm.add_codebook(site, Codebook(cfg))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"saved codebook does not fit this model: {e}") from e
        with torch.no_grad():
            cb.codebook.copy_(w)
            counts = tensors.get(f"{site}.code_counts")
            if counts is not None:
                cb.code_counts.copy_(counts)
        try:
            cb.load_extra_tensors(
                {n: tensors[f"{site}.{n}"] for n in cb.extra_tensors() if f"{site}.{n}" in tensors}
            )
        except ValueError as e:
            raise CheckpointError(f"codebooks.safetensors, {site}: {e}") from e
    return cm
