"""Readers of other formats: the reference implementation's (codebook-features 0.1.2) checkpoints.

>>> from codebook_lens.convert import from_codebook_features
>>> cm = from_codebook_features("taufeeque/TinyStories-1Layer-21M-Codebook")  # Hub id or directory
>>> logits, cache = cm.run_with_cache(tokens)
>>> cache["blocks.0.attn.hook_z.hook_codes"]  # [batch, pos, head, k], the reference's code ids

See ``docs/paper_models.md``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from codebook_lens.backends import bridge_over_hf, hooked_over_hf
from codebook_lens.convert.base import (
    KNOWN_BASES,
    hf_base_model,
    load_base_weights,
)
from codebook_lens.convert.files import (
    ReferenceCheckpoint,
    read_reference_checkpoint,
)
from codebook_lens.convert.placements import (
    ARCHITECTURES,
    PLACEMENTS,
    REFUSED_PLACEMENTS,
    ConvertedSite,
    base_state_dict,
    converted_sites,
)
from codebook_lens.errors import BackendError, CheckpointError
from codebook_lens.hub import resolve_dir
from codebook_lens.model import CodebookModel
from codebook_lens.quantizer import Codebook

__all__ = [
    "from_codebook_features",
    "convert_checkpoint",
    "read_reference_checkpoint",
    "ReferenceCheckpoint",
    "ConvertedSite",
    "converted_sites",
    "PLACEMENTS",
    "REFUSED_PLACEMENTS",
    "ARCHITECTURES",
    "KNOWN_BASES",
    "resolve_dir",
]


def _model_type(ckpt: ReferenceCheckpoint) -> str:
    archs = ckpt.config.get("architectures") or []
    if not archs or archs[0] not in ARCHITECTURES:
        raise CheckpointError(
            f"{ckpt.path}: architectures={archs}; supported reference models are "
            f"{sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[archs[0]].model_type


def _tl_kind(obj: Any) -> str | None:
    names = {c.__name__ for c in type(obj).__mro__}
    if "TransformerBridge" in names:
        return "bridge"
    if "HookedTransformer" in names:
        return "hooked"
    return None


def _base_for(src: Any, base_model: Any) -> Any:
    if base_model is not None:
        return base_model
    if str(src) in KNOWN_BASES:
        return KNOWN_BASES[str(src)]
    raise ValueError(
        f"no base model given for {src!r}; pass base_model= (a Hugging Face model, a directory "
        "or Hub id with its config and tokenizer, or a TransformerLens model). Known released "
        f"checkpoints and their bases: {KNOWN_BASES}"
    )


def _tl_model(base: Any, backend: str, ckpt: ReferenceCheckpoint, tokenizer: Any, rev: Any):
    sd = base_state_dict(ckpt.state_dict)
    kind = _tl_kind(base)
    if kind == "hooked":
        raise ValueError(
            "pass the HookedTransformer's base as a directory or Hub id with backend='hooked' "
            "(its weights come from the checkpoint)"
        )
    if kind == "bridge":
        if getattr(base, "_weights_processed", False):
            raise ValueError(
                "this TransformerBridge has processed weights (enable_compatibility_mode); pass "
                "one booted without it, or the base as a directory or Hub id"
            )
        load_base_weights(base.original_model, sd, zero_bias_ok=True)
        return base
    hf, name, tok = hf_base_model(base, _model_type(ckpt), rev)
    load_base_weights(hf, sd)
    tok = tokenizer if tokenizer is not None else tok
    boot = hooked_over_hf if backend == "hooked" else bridge_over_hf
    try:
        return boot(hf, name, tok)
    except BackendError as e:
        raise CheckpointError(f"cannot build the base model {name!r}: {e}") from e


def from_codebook_features(
    checkpoint: str | os.PathLike,
    base_model: str | os.PathLike | nn.Module | None = None,
    *,
    backend: str = "bridge",
    tokenizer: Any = None,
    revision: str | None = None,
    base_revision: str | None = None,
    device: str | torch.device | None = None,
) -> CodebookModel:
    """Open a codebook-features checkpoint as a :class:`CodebookModel`, with its exact semantics.

    Args:
        checkpoint: The reference's ``save_pretrained`` directory, or a Hub repo id (read
            through huggingface_hub's cache; works offline with ``HF_HUB_OFFLINE=1`` once cached).
        base_model: The model the codebooks were trained on: a Hugging Face model (its weights
            are replaced in place by the checkpoint's), a local directory or Hub id with its
            config and tokenizer (no base weights are downloaded), or a ``TransformerBridge``
            booted from it without compatibility mode (its weights are replaced in place).
            Optional for the paper's released checkpoints (:data:`KNOWN_BASES`).
        backend: ``"bridge"`` (``TransformerBridge.boot_transformers``, both transformer-lens
            generations) or ``"hooked"`` (``HookedTransformer.from_pretrained_no_processing``,
            transformer-lens 3.x, for architectures it loads; ``base_model`` a directory or
            Hub id).
        tokenizer: Tokenizer for the bridge, when the base has none to load.
        revision: Hub revision of ``checkpoint``.
        base_revision: Hub revision of ``base_model``.
        device: Where to put the model (default: where the base model is).

    Raises:
        CheckpointError: unreadable or foreign files, a pickle holding non-tensors, a placement
            that has no TransformerLens hook point, or a base model that does not fit (both
            shapes named).
    """
    ckpt = read_reference_checkpoint(checkpoint, revision)
    if backend not in ("bridge", "hooked"):
        raise ValueError(f"backend={backend!r}; choose 'bridge' or 'hooked'")
    base = _base_for(checkpoint, base_model)
    model = _tl_model(base, backend, ckpt, tokenizer, base_revision)
    if device is not None:
        model = model.to(device)
    cfg = model.cfg
    sites = converted_sites(ckpt.config, ckpt.state_dict, cfg.n_layers, cfg.n_heads)
    cm = CodebookModel(model)
    for s in sites:
        try:
            cb = cm.add_codebook(s.site, Codebook(s.cfg))
        except (KeyError, ValueError) as e:
            raise CheckpointError(
                f"the checkpoint's codebook for {s.site} (codebook {tuple(s.codebook.shape)}) does "
                f"not fit the base model: {e}"
            ) from e
        state = Codebook.checked_state(s.state, s.cfg, f"{ckpt.path} ({s.site})")
        cb.load_state_dict(state, strict=False)  # a fresh codebook's usage counts
    return cm


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    base_model: str | os.PathLike | nn.Module | None = None,
    **kwargs: Any,
) -> CodebookModel:
    """Convert ``checkpoint`` and save it to directory ``out`` in our format with the base model
    included, so that ``CodebookModel.load(out)`` alone restores it (no reference code, no base
    path). ``kwargs`` go to :func:`from_codebook_features`. A TokFSM checkpoint's machine
    (``fsm.npy``) is the TokFSM package's: :func:`codebook_lens.fsm.save_reference_fsm` writes
    it beside as ``fsm.json`` (``codebook-lens convert`` calls both)."""
    cm = from_codebook_features(checkpoint, base_model, **kwargs)
    cm.save(out, include_model=True)
    return cm
