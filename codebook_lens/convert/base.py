"""The base model of a converted checkpoint: a Hugging Face model holding the checkpoint's weights,
booted as a TransformerBridge (or, on transformer-lens 3.x, loaded as a HookedTransformer).

The reference saves the whole wrapped model, so the checkpoint holds every base weight (finetuned
ones included). The base model given by the user supplies the architecture (its config) and the
tokenizer; its weights are replaced by the checkpoint's.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from codebook_lens.errors import CheckpointError

__all__ = ["KNOWN_BASES", "hf_base_model", "load_base_weights"]

KNOWN_BASES = {
    "taufeeque/TinyStories-1Layer-21M-Codebook": "roneneldan/TinyStories-1Layer-21M",
    "taufeeque/pythia410m_wikitext_attn_codebook_model": "EleutherAI/pythia-410m-deduped",
}
"""Base models of the paper's released checkpoints (used when no base model is given)."""


def _is_hf_model(obj: Any) -> bool:
    from transformers import PreTrainedModel

    return isinstance(obj, PreTrainedModel)


def hf_base_model(
    base: str | os.PathLike | nn.Module, model_type: str, revision: str | None = None
) -> tuple[nn.Module, str, Any]:
    """(HF model, its name or path, tokenizer or None) for ``base``: an HF model object (used
    in place), or a local directory or Hub id whose config builds a fresh model (no weights are
    downloaded: the checkpoint holds them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if _is_hf_model(base):
        model, name, tok = base, str(getattr(base.config, "_name_or_path", "") or ""), None
    elif isinstance(base, (str, os.PathLike)):
        name = str(base)
        try:
            config = AutoConfig.from_pretrained(name, revision=revision)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the base model's config from {name!r}: {e}") from e
        _check_type(config.model_type, model_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config)
        try:
            tok = AutoTokenizer.from_pretrained(name, revision=revision)
        except (OSError, ValueError, KeyError):
            tok = None
    else:
        raise TypeError(
            f"base_model must be a Hugging Face model, a TransformerLens model, a local directory"
            f" or a Hub id; got {type(base).__name__}"
        )
    _check_type(model.config.model_type, model_type)
    return model.eval(), name, tok


def _check_type(got: str, want: str) -> None:
    if got != want:
        raise CheckpointError(
            f"the base model is a {got!r} model, but the checkpoint wraps a {want!r} model; "
            "pass the base model the codebooks were trained on"
        )


def _hf_view(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` keyed as the plain HF model (a bridge wraps the HF modules in
    place, adding ``_original_component`` levels); the tensors share the parameters' storage."""
    return {k.replace("_original_component.", ""): v for k, v in model.state_dict().items()}


def load_base_weights(model: nn.Module, sd: dict[str, Tensor], zero_bias_ok: bool = False) -> None:
    """Copy the checkpoint's base weights into ``model`` (an HF model, or a bridge's
    ``original_model``); a shape that differs names both shapes, a missing or unknown weight
    names the key. Weights tied to a saved one (the output embedding) may be absent, and with
    ``zero_bias_ok`` so may all-zero biases (a bridge adds a zero ``lm_head.bias``)."""
    own = _hf_view(model)
    sd = _renamed(sd, own)
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own]
    bad = [b for b in bad if b[1] != b[2]]
    if bad:
        k, ck, base = bad[0]
        raise CheckpointError(
            f"the base model does not fit the checkpoint: {k} has shape {ck} in the checkpoint "
            f"and {base} in the base model ({len(bad)} tensors differ)"
        )
    unknown = [k for k in sd if k not in own and not k.endswith(_BUFFERS)]
    if unknown:
        raise CheckpointError(
            f"the base model does not fit the checkpoint: it has no {unknown[0]!r} "
            f"({len(unknown)} checkpoint tensors unknown to it)"
        )
    saved = {own[k].data_ptr() for k in sd if k in own}
    missing = [
        k
        for k, v in own.items()
        if k not in sd and v.data_ptr() not in saved and not k.endswith(_BUFFERS)
    ]
    if zero_bias_ok:
        missing = [k for k in missing if not (k.endswith("bias") and not own[k].any())]
    if missing:
        raise CheckpointError(f"the checkpoint has no base weight {missing[0]!r}")
    with torch.no_grad():
        for k, v in sd.items():
            if k in own:
                own[k].copy_(v)


# weights that newer transformers name differently (old prefix, new prefix)
_RENAMES = (("embed_out.", "lm_head."),)


def _renamed(sd: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sd`` with keys renamed where the model names a weight as a newer transformers does."""
    out = {}
    for k, v in sd.items():
        for old, new in _RENAMES:
            if k.startswith(old) and k not in own and new + k[len(old) :] in own:
                k = new + k[len(old) :]
        out[k] = v
    return out


# buffers that transformers versions add or drop (causal masks, rotary frequencies)
_BUFFERS = ("attn.bias", "attn.masked_bias", "attention.bias", "attention.masked_bias", "inv_freq")
