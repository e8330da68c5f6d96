"""Save and load codebook models: ``cfg.json`` plus safetensors, written atomically, no pickle.

Layout of a saved directory::

    cfg.json                 format marker, library version, backend, sites and their configs
    codebooks.safetensors    "<site>.codebook" [n_groups, n_codes, d_in], "<site>.code_counts"
    model.safetensors        (include_model=True) the base model's state dict
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from codebook_lens.config import CodebookConfig
from codebook_lens.quantizer import Codebook

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_write_dir",
    "atomic_write_text",
    "save_codebook_model",
    "load_codebook_model",
    "model_config_dict",
    "build_model",
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


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The base model's config as JSON-ready data, with the class needed to rebuild it."""
    from codebook_lens.model import _backend

    backend = _backend(model)
    cfg = model.cfg
    if backend == "bridge" and getattr(cfg, "architecture", None) not in (
        None,
        "TransformerLensNative",
    ):
        raise CheckpointError(
            f"include_model=True only stores HookedTransformer and native TransformerBridge "
            f"models; this bridge wraps {cfg.architecture!r}. Save without include_model and "
            "pass the model to CodebookModel.load(path, model)."
        )
    d = cfg.to_dict()
    d = {
        k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
        for k, v in d.items()
    }
    d.pop("device", None)
    json.dumps(d)  # fail here, not half-way through a write
    return {"backend": backend, "config": d}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a (randomly initialised) base model from :func:`model_config_dict` output."""
    cfg = dict(spec["config"])
    if isinstance(cfg.get("dtype"), str):
        cfg["dtype"] = getattr(torch, cfg["dtype"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if spec["backend"] == "bridge":
            from transformer_lens.model_bridge import TransformerBridge

            return TransformerBridge.boot_native(cfg)
        try:
            from transformer_lens import HookedTransformer, HookedTransformerConfig
        except ImportError as e:  # transformer-lens >= 4
            raise CheckpointError(
                "this checkpoint holds a HookedTransformer, which this transformer-lens version "
                "no longer has; install transformer-lens<4 or pass a model to load()"
            ) from e
        return HookedTransformer(HookedTransformerConfig(**cfg))


def save_codebook_model(cm: Any, path: str | os.PathLike, include_model: bool = False) -> None:
    """Save a :class:`CodebookModel` to directory ``path`` (replaced atomically)."""
    from codebook_lens import __version__

    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "backend": cm.backend,
        "sites": [{"site": s, "config": cb.cfg.to_dict()} for s, cb in cm.codebooks.items()],
        "model": model_config_dict(cm.model) if include_model else None,
    }
    tensors = {}
    for site, cb in cm.codebooks.items():
        tensors[f"{site}.codebook"] = cb.codebook.detach().contiguous().cpu()
        tensors[f"{site}.code_counts"] = cb.code_counts.detach().contiguous().cpu()
    with atomic_write_dir(path) as tmp:
        save_file(tensors, str(tmp / "codebooks.safetensors"), metadata={"format": FORMAT})
        if include_model:
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


def load_codebook_model(path: str | os.PathLike, model: nn.Module | None = None) -> Any:
    """Rebuild a saved :class:`CodebookModel` on ``model`` (or the saved base model)."""
    from codebook_lens.model import CodebookModel

    path = Path(path)
    meta = _read_meta(path)
    if model is None:
        if not meta.get("model"):
            raise CheckpointError(
                f"{path} was saved without the base model; pass it: "
                "CodebookModel.load(path, model), or save with include_model=True"
            )
        model = build_model(meta["model"])
        sd = _load_tensors(path / "model.safetensors")
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if not m.endswith(("IGNORE", "mask"))]:
            raise CheckpointError(
                f"model.safetensors does not fit the saved config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        model.eval()
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
    return cm
