"""Save and load codebook models: ``cfg.json`` plus safetensors, written atomically, no pickle.

Layout of a saved directory (see :mod:`codebook_lens.atomic` for the versioning and locks)::

    cfg.json                 format marker, library version, backend, sites and their configs,
                             "data_dir": the version directory below (the commit pointer)
    v-model-<hex>/codebooks.safetensors
                             "<site>.codebook" [n_groups, n_codes, d_in], "<site>.code_counts"
                             [n_groups, n_codes], "<site>.ln_weight", "<site>.ln_bias"
                             [n_groups, d_in] (affine norm)
    v-model-<hex>/model.safetensors
                             (include_model=True) the base model's state dict
    v-model-<hex>/hf_model/  (include_model=True, Hugging Face-booted bridge) its config

Checkpoints of earlier versions keep the data files directly beside ``cfg.json`` (no
``data_dir``); they still load. Loading is data only: the JSON is validated field by field,
every tensor's dtype, shape and finiteness are checked before use, and nothing is imported,
executed or downloaded (a saved model config's tokenizer names and ``trust_remote_code`` are
ignored).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from codebook_lens.atomic import CheckpointError, DirKind, open_dir, save_dir
from codebook_lens.backends import (
    HF_DIR,
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
    "MODEL_KIND",
    "CheckpointError",
    "save_codebook_model",
    "load_base_model",
    "load_codebook_model",
    "check_tensor",
]

FORMAT = "codebook_lens"
FORMAT_VERSION = 1

MODEL_KIND = DirKind(
    name="CodebookModel checkpoint",
    head="cfg.json",
    format=FORMAT,
    tag="model",
    flat=("codebooks.safetensors", "model.safetensors", HF_DIR),
    saver="CodebookModel.save",
)
"""The on-disk kind of a saved CodebookModel (for :mod:`codebook_lens.atomic`)."""


def save_codebook_model(
    cm: Any, path: str | os.PathLike, include_model: bool = False, overwrite: bool = False
) -> None:
    """Save a :class:`CodebookModel` to directory ``path`` in one atomic step.

    Refuses ``""``/``"."``, a file, a symlink, or a directory holding anything but a
    CodebookModel checkpoint (``overwrite=True`` allows the latter; only our own files are
    replaced). A kill at any moment leaves the old or the new checkpoint.
    """
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

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "codebooks.safetensors"), metadata={"format": FORMAT})
        if include_model:
            if meta["model"]["source"] == "hf":
                write_hf_config(cm.model, tmp / HF_DIR)
            sd = {k: v.detach().contiguous().cpu() for k, v in cm.model.state_dict().items()}
            save_file(_untie(sd), str(tmp / "model.safetensors"), metadata={"format": FORMAT})

    save_dir(path, MODEL_KIND, meta, write, overwrite=overwrite)


def _untie(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; copy tensors that alias another."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _check_meta(meta: dict[str, Any], file: Path) -> None:
    """Refuse a cfg.json whose fields have the wrong types or are missing."""
    version = meta.get("format_version")
    if type(version) is not int:
        raise CheckpointError(
            f"{file}: format_version must be an integer, got {version!r}; the checkpoint is "
            "corrupt or was not written by CodebookModel.save"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} uses format version {version}; this codebook_lens reads up to "
            f"{FORMAT_VERSION}. Upgrade codebook_lens."
        )
    if version < 1:
        raise CheckpointError(f"{file}: format_version {version} is not a valid version")
    for key, types in (("backend", (str, type(None))), ("model", (dict, type(None)))):
        if not isinstance(meta.get(key), types):
            raise CheckpointError(f"{file}: {key!r} must be {_names(types)}, got {meta.get(key)!r}")
    sites = meta.get("sites")
    if not isinstance(sites, list):
        raise CheckpointError(f"{file}: 'sites' must be a list of {{site, config}}, got {sites!r}")
    seen: set[str] = set()
    for i, entry in enumerate(sites):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("site"), str)
            and isinstance(entry.get("config"), dict)
        ):
            raise CheckpointError(
                f"{file}: sites[{i}] must be {{'site': str, 'config': dict}}, got {entry!r}"
            )
        if entry["site"] in seen:
            raise CheckpointError(f"{file}: site {entry['site']!r} is listed twice")
        seen.add(entry["site"])


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _site_config(entry: dict[str, Any], file: Path) -> CodebookConfig:
    try:
        return CodebookConfig.from_dict(entry["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{file}: the config of site {entry['site']!r} is invalid: {e}"
        ) from e


def check_tensor(
    t: torch.Tensor, name: str, file: Path, shape: tuple[int, ...] | None, kind: str
) -> torch.Tensor:
    """``t`` if it has ``shape`` and is a finite ``kind`` tensor (``"float"``: floating point;
    ``"count"``: integer or floating, >= 0; ``"int"``: integer), else a CheckpointError naming
    ``name`` in ``file``."""
    ok = {
        "float": t.is_floating_point(),
        "count": (t.is_floating_point() or _is_int(t)),
        "int": _is_int(t),
    }[kind]
    if not ok:
        raise CheckpointError(f"{file}: {name} has dtype {t.dtype}; expected a {kind} tensor")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(
            f"{file}: {name} has shape {tuple(t.shape)}, but its config says {tuple(shape)}"
        )
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(
            f"{file}: {name} holds NaN or inf values; the checkpoint was saved from a diverged "
            "model. Load an earlier checkpoint"
        )
    if kind == "count" and t.numel() and bool((t < 0).any()):
        raise CheckpointError(f"{file}: {name} holds negative counts; the checkpoint is corrupt")
    return t


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


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
    with open_dir(path, MODEL_KIND) as (meta, data):
        _check_meta(meta, path / MODEL_KIND.head)
        return _base_model(meta, data, path, backend)


def _base_model(meta: dict[str, Any], data: Path, path: Path, backend: str) -> nn.Module:
    spec = meta.get("model")
    if not spec:
        raise CheckpointError(
            f"{path} was saved without the base model; pass it: "
            "CodebookModel.load(path, model), or save with include_model=True"
        )
    file = data / "model.safetensors"
    sd = _load_tensors(file)
    for k, v in sd.items():  # buffers may hold -inf (attention masks); NaN is never valid
        if v.is_floating_point() and bool(torch.isnan(v).any()):
            raise CheckpointError(f"{file}: {k} holds NaN values; load an earlier checkpoint")
    try:
        model = rebuild_model(spec, data, backend, n_saved=sum(v.numel() for v in sd.values()))
        load_weights(model, sd, spec)
    except CheckpointError:
        raise
    except Exception as e:  # the config is untrusted data: TransformerLens asserts, divides...
        raise CheckpointError(f"cannot rebuild the base model saved in {path}: {e}") from e
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{file}: parameter {name} holds inf values; it is corrupt")
    return model.eval()


def _site_tensors(
    site: str, cfg: CodebookConfig, tensors: dict[str, torch.Tensor], file: Path
) -> dict[str, torch.Tensor]:
    """The checked tensors of one site: codebook, code_counts (if saved), affine LayerNorm."""
    g, n, d = cfg.n_groups, cfg.n_codes, cfg.d_in
    key = f"{site}.codebook"
    if key not in tensors:
        raise CheckpointError(f"{file} has no tensor {key!r}")
    out = {"codebook": check_tensor(tensors[key], key, file, (g, n, d), "float")}
    if f"{site}.code_counts" in tensors:
        key = f"{site}.code_counts"
        out["code_counts"] = check_tensor(tensors[key], key, file, (g, n), "count")
    if cfg.input_norm == "affine":
        for name in ("ln_weight", "ln_bias"):
            key = f"{site}.{name}"
            if key not in tensors:
                raise CheckpointError(f"{file} has no tensor {key!r} (input_norm='affine')")
            out[name] = check_tensor(tensors[key], key, file, (g, d), "float")
    return out


def load_codebook_model(
    path: str | os.PathLike, model: nn.Module | None = None, backend: str = "auto"
) -> Any:
    """Rebuild a saved :class:`CodebookModel` on ``model`` (or the saved base model, on
    ``backend``). Every field and tensor is checked before ``model`` is touched; a bad file
    raises :class:`CheckpointError` naming it."""
    if model is None:
        resolve_backend(backend)  # an argument error, before any file is read
    path = Path(path)
    with open_dir(path, MODEL_KIND) as (meta, data):
        head = path / MODEL_KIND.head
        _check_meta(meta, head)
        configs = {e["site"]: _site_config(e, head) for e in meta["sites"]}
        file = data / "codebooks.safetensors"
        tensors = _load_tensors(file)
        checked = {s: _site_tensors(s, c, tensors, file) for s, c in configs.items()}
        if model is None:
            model = _base_model(meta, data, path, backend)
    return _attach(model, configs, checked)


def _attach(
    model: nn.Module,
    configs: dict[str, CodebookConfig],
    checked: dict[str, dict[str, torch.Tensor]],
) -> Any:
    from codebook_lens.model import CodebookModel

    cm = CodebookModel(model)
    try:
        for site, cfg in configs.items():
            try:
                cb = cm.add_codebook(site, Codebook(cfg))
            except (KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"saved codebook does not fit this model: {e}") from e
            t = checked[site]
            with torch.no_grad():
                cb.codebook.copy_(t["codebook"])
                if "code_counts" in t:
                    cb.code_counts.copy_(t["code_counts"])
            extra = {n: t[n] for n in ("ln_weight", "ln_bias") if n in t}
            if extra:
                cb.load_extra_tensors(extra)
    except BaseException:
        cm.detach()  # leave the caller's model as it was
        raise
    return cm
