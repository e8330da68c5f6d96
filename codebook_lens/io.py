"""Read and write CodebookModel checkpoints: ``cfg.json`` plus safetensors, atomically, no pickle.

Loading is one-way, as in SAELens's ``loading/``: :func:`read_codebooks` returns configs and
checked tensors and never builds a :class:`~codebook_lens.model.CodebookModel` (that is
``CodebookModel.load``'s job), so this module does not import the model class.

Layout of a saved directory (see :mod:`codebook_lens.atomic` for the versioning and locks)::

    cfg.json                 format marker, library version, backend, sites and their configs,
                             the base model's spec and dtype, "tensors": the record of each
                             safetensors file (every tensor's dtype, shape and SHA-256),
                             "files": the SHA-256 of each file under hf_model/,
                             "data_dir": the version directory below (the commit pointer)
    v-model-<hex>/codebooks.safetensors
                             "<site>.<name>" for each tensor of the codebook's state_dict()
                             but the training state (Codebook.TRAINING_STATE): "codebook"
                             [n_groups, n_codes, d_in], "ln_weight", "ln_bias" [n_groups,
                             d_in] (affine norm), "code_counts" [n_groups, n_codes]
    v-model-<hex>/model.safetensors
                             (include_model=True) the base model's state dict
    v-model-<hex>/hf_model/  (include_model=True, Hugging Face-booted bridge) its config

Loading is data only: the
JSON is validated field by field, every tensor is compared with the record (a missing, extra,
swapped or foreign tensor or file is refused, :mod:`codebook_lens.integrity`), its dtype, shape
and finiteness are checked before use, the base model comes back in its saved dtype, and
nothing is imported, executed or downloaded (a saved model config's tokenizer names and
``trust_remote_code`` are ignored).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from codebook_lens.atomic import DirKind, open_dir, save_dir
from codebook_lens.backends import (
    HF_DIR,
    load_weights,
    model_spec,
    rebuild_model,
    resolve_backend,
    write_hf_config,
)
from codebook_lens.config import CodebookConfig
from codebook_lens.errors import CheckpointError
from codebook_lens.integrity import (
    check_files,
    check_tensors,
    dtype_name,
    float_dtype,
    record_files,
    record_tensors,
)
from codebook_lens.quantizer import Codebook
from codebook_lens.tensor_files import (
    read_tensors,
    untie,
    write_tensors,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_KIND",
    "CheckpointError",
    "SavedCodebooks",
    "write_codebooks",
    "read_codebooks",
    "load_base_model",
]

FORMAT = "codebook_lens"
FORMAT_VERSION = 2
"""2: ``cfg.json`` records every tensor and hf_model/ file, and the base model's dtype."""

MODEL_KIND = DirKind(
    name="CodebookModel checkpoint",
    head="cfg.json",
    format=FORMAT,
    tag="model",
    saver="CodebookModel.save",
)
"""The on-disk kind of a saved CodebookModel (for :mod:`codebook_lens.atomic`)."""


@dataclass(frozen=True)
class SavedCodebooks:
    """A CodebookModel checkpoint as read from disk, every field and tensor checked."""

    configs: dict[str, CodebookConfig]
    """The config of each site's codebook, in attachment order."""
    tensors: dict[str, dict[str, Tensor]]
    """Per site, the codebook's ``state_dict()`` less :attr:`Codebook.TRAINING_STATE`:
    ``"codebook"`` [n_groups, n_codes, d_in], for ``input_norm="affine"`` ``"ln_weight"`` and
    ``"ln_bias"`` [n_groups, d_in], ``"code_counts"`` [n_groups, n_codes] (when saved)."""
    model: nn.Module | None
    """The saved base model, rebuilt (when asked for and saved with ``include_model=True``)."""


def write_codebooks(
    path: str | os.PathLike,
    codebooks: Mapping[str, Codebook],
    backend: str,
    model: nn.Module | None = None,
    overwrite: bool = False,
) -> None:
    """Save ``codebooks`` (site -> codebook, in attachment order) and, if given, the base
    ``model`` to directory ``path`` in one atomic step.

    Refuses ``""``/``"."``, a file, a symlink, or a directory holding anything but a
    CodebookModel checkpoint (``overwrite=True`` allows the latter; only our own files are
    replaced). A kill at any moment leaves the old or the new checkpoint.
    """
    from codebook_lens import __version__  # the package imports this module

    tensors = {
        f"{site}.{name}": t
        for site, cb in codebooks.items()
        for name, t in cb.state_dict().items()
        if name not in Codebook.TRAINING_STATE
    }
    files = {"codebooks.safetensors": untie(tensors)}
    if model is not None:
        files["model.safetensors"] = untie(model.state_dict())
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "backend": backend,
        "sites": [{"site": s, "config": cb.cfg.to_dict()} for s, cb in codebooks.items()],
        "model": None if model is None else {**model_spec(model), "dtype": _model_dtype(model)},
        "tensors": {name: record_tensors(t) for name, t in files.items()},  # the bytes written
        "files": {},
    }

    def write(tmp: Path) -> None:
        for name, ready in files.items():
            write_tensors(ready, tmp / name, FORMAT)
        if model is not None and meta["model"]["source"] == "hf":
            write_hf_config(model, tmp / HF_DIR)
            # save_dir writes the head after this function returns, so the record lands in it
            meta["files"] = record_files(tmp, HF_DIR)

    save_dir(path, MODEL_KIND, meta, write, overwrite=overwrite)


def _model_dtype(model: nn.Module) -> str | None:
    """The one floating dtype of ``model``'s parameters (None when mixed or none)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtype_name(dtypes.pop()) if len(dtypes) == 1 else None


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
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format_version {version} is not a version this codebook_lens reads (it "
            f"reads {FORMAT_VERSION}); save the model again with CodebookModel.save"
        )
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
    _check_model_meta(meta, file)
    _check_record(meta, file)


def _check_model_meta(meta: dict[str, Any], file: Path) -> None:
    """Refuse a base-model spec whose dtype names no floating dtype."""
    spec = meta.get("model")
    if not spec:
        return
    config = spec.get("config")
    if isinstance(config, dict) and config.get("dtype") is not None:
        float_dtype(config["dtype"], f"{file}: model.config.dtype")
    if spec.get("dtype") is not None:
        float_dtype(spec["dtype"], f"{file}: model.dtype")


def _check_record(meta: dict[str, Any], file: Path) -> None:
    """The head records every data file it points to."""
    want = ["codebooks.safetensors"] + (["model.safetensors"] if meta.get("model") else [])
    rec = meta.get("tensors")
    if not isinstance(rec, dict) or not all(isinstance(rec.get(n), dict) for n in want):
        raise CheckpointError(
            f"{file}: 'tensors' must hold the record of {want} (format version 2 writes it), "
            f"got {str(rec)[:200]}; the head file is corrupt"
        )
    if not isinstance(meta.get("files"), dict):
        raise CheckpointError(
            f"{file}: 'files' must map paths to SHA-256, got {meta.get('files')!r}; the head "
            "file is corrupt"
        )


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _site_config(entry: dict[str, Any], file: Path) -> CodebookConfig:
    try:
        return CodebookConfig.from_dict(entry["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{file}: the config of site {entry['site']!r} is invalid: {e}"
        ) from e


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
    check_files(data, HF_DIR, meta["files"], path)
    sd = read_tensors(file)
    check_tensors(sd, meta["tensors"]["model.safetensors"], file)
    for k, v in sd.items():  # buffers may hold -inf (attention masks); NaN is never valid
        if v.is_floating_point() and bool(torch.isnan(v).any()):
            raise CheckpointError(f"{file}: {k} holds NaN values; load an earlier checkpoint")
    try:
        dtype = _saved_dtype(spec, path)
        model = rebuild_model(spec, data, backend, n_saved=sum(v.numel() for v in sd.values()))
        if dtype is not None and {p.dtype for p in model.parameters()} != {dtype}:
            model.to(dtype)  # before the weights go in, so that they are copied exactly
        load_weights(model, sd, spec)
    except CheckpointError:
        raise
    except Exception as e:  # the config is untrusted data: TransformerLens asserts, divides...
        raise CheckpointError(f"cannot rebuild the base model saved in {path}: {e}") from e
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{file}: parameter {name} holds inf values; it is corrupt")
    return model.eval()


def _saved_dtype(spec: dict[str, Any], path: Path) -> torch.dtype | None:
    """The base model's saved dtype, as recorded (None: mixed)."""
    name = spec.get("dtype")
    return None if name is None else float_dtype(name, f"{path}: model.dtype")


def read_codebooks(
    path: str | os.PathLike, with_model: bool = False, backend: str = "auto"
) -> SavedCodebooks:
    """Read the CodebookModel checkpoint in directory ``path``: configs and checked tensors,
    and (``with_model=True``) the saved base model rebuilt on ``backend``. Nothing is attached
    anywhere; a bad file raises :class:`CheckpointError` naming it."""
    if with_model:
        resolve_backend(backend)  # an argument error, before any file is read
    path = Path(path)
    with open_dir(path, MODEL_KIND) as (meta, data):
        head = path / MODEL_KIND.head
        _check_meta(meta, head)
        configs = {e["site"]: _site_config(e, head) for e in meta["sites"]}
        file = data / "codebooks.safetensors"
        tensors = read_tensors(file)
        checked = {
            s: Codebook.checked_state(tensors, c, file, prefix=f"{s}.") for s, c in configs.items()
        }
        # after the config checks, whose messages are sharper
        check_tensors(tensors, meta["tensors"]["codebooks.safetensors"], file)
        model = _base_model(meta, data, path, backend) if with_model else None
    return SavedCodebooks(configs, checked, model)
