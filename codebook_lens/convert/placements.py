"""Map a codebook-features config and state dict onto TransformerLens hook points.

The reference wraps HF modules (``CODEBOOK_METHODS`` in its ``models.py``); each placement that
quantizes the output of one module is one TransformerLens hook point here. Its codebook layers
apply a learned LayerNorm (eps 1e-5) to their input, rank codes by ``x.c/|c|`` (the ranking of
cosine similarity) or by euclidean distance, and emit the mean of the k chosen codes in the
LayerNorm's space: ``input_norm="affine"``, ``combine="mean"`` here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from codebook_lens.config import CodebookConfig
from codebook_lens.errors import CheckpointError

__all__ = [
    "ARCHITECTURES",
    "PLACEMENTS",
    "REFUSED_PLACEMENTS",
    "ConvertedSite",
    "base_state_dict",
    "converted_sites",
]


@dataclass(frozen=True)
class _Arch:
    model_type: str  # the base model's HF model_type
    layers: str  # module path of the list of blocks
    attn: str  # attention module, relative to a block
    mlp: str = "mlp"
    act: str = "act"  # the MLP's activation, relative to the MLP


ARCHITECTURES = {
    "GPT2CodebookModel": _Arch("gpt2", "transformer.h", "attn"),
    "GPTNeoXCodebookModel": _Arch("gpt_neox", "gpt_neox.layers", "attention"),
    "GPTNeoCodebookModel": _Arch("gpt_neo", "transformer.h", "attn.attention"),
}
"""The reference's codebook model classes and where their modules live."""

# placement: (wrapped module relative to a block, TransformerLens hook point)
PLACEMENTS = {
    "attn_preproj": ("{attn}", "blocks.{L}.attn.hook_z"),
    "attn": ("{attn}", "blocks.{L}.hook_attn_out"),
    "mlp": ("{mlp}", "blocks.{L}.hook_mlp_out"),
    "mlp_mid": ("{mlp}.{act}", "blocks.{L}.mlp.hook_post"),
    "transformer_block": ("", "blocks.{L}.hook_resid_post"),
}
"""Supported ``codebook_at`` values and the hook point each becomes."""

REFUSED_PLACEMENTS = {
    "qkv": "it quantizes the fused query/key/value projection in 3 * num_codebooks chunks, "
    "which is not one TransformerLens hook point (q, k and v are separate hooks there)",
    "attn_plus_mlp": "it quantizes attn_out + mlp_out before the residual add, a sum that no "
    "TransformerLens hook point carries",
}
"""``codebook_at`` values of the reference that cannot be converted, each with the reason."""


@dataclass
class ConvertedSite:
    """One reference codebook layer, as a hook point, a config and its tensors."""

    site: str
    """TransformerLens hook name (``blocks.0.attn.hook_z``)."""

    cfg: CodebookConfig
    """Config with the reference's semantics (affine LayerNorm input, mean of k codes)."""

    state: dict[str, Tensor]
    """The codebook's state as the reference saved it, named as in ``Codebook.state_dict()``:
    ``codebook`` ``[n_groups, n_codes, d_in]``, ``ln_weight`` and ``ln_bias``
    ``[n_groups, d_in]`` (no usage counts)."""

    @property
    def codebook(self) -> Float[Tensor, "n_groups n_codes d_in"]:
        """Code vectors."""
        return self.state["codebook"]


def _normalize_key(key: str) -> str:
    """Drop the wrapper's ``model.`` prefix and every ``module_layer.`` level."""
    key = key.removeprefix("model.")
    return re.sub(r"(^|\.)module_layer\.", r"\1", key)


def base_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The base model's own tensors, keyed as in the unwrapped HF model."""
    out = {}
    for key, value in sd.items():
        norm = _normalize_key(key)
        if "codebook_layer." not in norm:
            out[norm] = value
    return out


def _per_placement(cfg: dict[str, Any], key: str, n: int) -> list[Any]:
    value = cfg.get(key)
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise CheckpointError(f"config.json: {key} has {len(value)} entries; codebook_at has {n}")
    return list(value)


def _layers(cfg: dict[str, Any], n_layers: int) -> list[int]:
    layers = cfg.get("layers_to_snap", [])
    if layers == "all":
        return list(range(n_layers))
    out = sorted(int(i) + n_layers if int(i) < 0 else int(i) for i in layers)
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise CheckpointError(f"layers_to_snap {bad} outside the base model's {n_layers} layers")
    return out


def _tensors(sd: dict[str, Tensor], prefix: str, grouped: int) -> tuple[Tensor, Tensor, Tensor]:
    """(codebook [G, N, d], ln weight [G, d], ln bias [G, d]) under ``prefix``."""
    names = ["codebook.weight", "ln.weight", "ln.bias"]
    heads = [f"codebook.{h}." for h in range(grouped)] if grouped else [""]
    out = []
    for name in names:
        keys = [prefix + head + name for head in heads]
        missing = [k for k in keys if k not in sd]
        if missing:
            raise CheckpointError(f"the checkpoint has no tensor {missing[0]!r}")
        out.append(torch.stack([sd.pop(k) for k in keys]))
    return out[0], out[1], out[2]


def _site_config(
    at: str, shape: tuple[int, int, int], n_heads: int, k: int, similarity: str, info: dict
) -> CodebookConfig:
    n_groups, n_codes, d_in = shape
    if at == "attn_preproj" and n_groups not in (1, n_heads):
        raise CheckpointError(
            f"attn_preproj with num_codebooks={n_groups} is not supported: attn.hook_z takes one "
            f"codebook per head (num_codebooks={n_heads}) or one over all heads (1)"
        )
    return CodebookConfig(
        d_in=d_in,
        n_codes=n_codes,
        k=k,
        n_groups=n_groups,
        similarity="cosine" if similarity == "inner_product" else "euclidean",
        combine="mean",
        input_norm="affine",
        init="random",
        extra=info,
    )


def _check_order(at_list: list[str]) -> None:
    """The reference wraps the block for ``transformer_block``; an ``attn``, ``attn_preproj`` or
    ``mlp`` listed after it is set on the wrapper, not on the block, and never runs there, so
    such a checkpoint has codebooks its model never used."""
    if "transformer_block" not in at_list:
        return
    later = at_list[at_list.index("transformer_block") + 1 :]
    dead = [at for at in later if at in ("attn", "attn_preproj", "mlp")]
    if dead:
        raise CheckpointError(
            f"codebook_at={at_list}: in the reference, {dead} listed after 'transformer_block' "
            "never run (they are set on the block's wrapper), so the checkpoint's model did not "
            "use them; this layout is not converted"
        )


def converted_sites(
    config: dict[str, Any], sd: dict[str, Tensor], n_layers: int, n_heads: int
) -> list[ConvertedSite]:
    """Every codebook of a reference checkpoint as a :class:`ConvertedSite`.

    ``sd`` is the checkpoint's state dict; its codebook tensors are consumed, and any left over
    (a layout this reader does not know) raise :class:`CheckpointError`.
    """
    arch = ARCHITECTURES[config["architectures"][0]]
    at_list = config.get("codebook_at", [])
    at_list = [at_list] if isinstance(at_list, str) else list(at_list)
    n = len(at_list)
    types, groups, ks, n_codes = (
        _per_placement(config, key, n)
        for key in ("codebook_type", "num_codebooks", "k_codebook", "num_codes")
    )
    similarity = config.get("similarity_metric", "inner_product")
    if similarity not in ("inner_product", "euclidean"):
        raise CheckpointError(
            f"similarity_metric={similarity!r}; expected inner_product or euclidean"
        )
    for at in at_list:
        if at in REFUSED_PLACEMENTS:
            raise CheckpointError(
                f"codebook_at={at!r} cannot be converted: {REFUSED_PLACEMENTS[at]}. Supported "
                f"placements: {sorted(PLACEMENTS)}"
            )
        if at not in PLACEMENTS:
            raise CheckpointError(
                f"unknown codebook_at={at!r}; supported placements: {sorted(PLACEMENTS)}"
            )
    _check_order(at_list)
    cb_sd = {_normalize_key(k): v for k, v in sd.items() if "codebook_layer." in k}
    sites = []
    for layer in _layers(config, n_layers):
        for i, at in enumerate(at_list):
            module, hook = PLACEMENTS[at]
            rel = module.format(attn=arch.attn, mlp=arch.mlp, act=arch.act)
            prefix = ".".join(p for p in (arch.layers, str(layer), rel, "codebook_layer.") if p)
            grouped = groups[i] if types[i] == "group" else 0
            if grouped == -1:
                grouped = n_heads
            w, ln_w, ln_b = _tensors(cb_sd, prefix, grouped)
            info = {"converted_from": "codebook-features", "codebook_at": at, "layer": layer}
            cfg = _site_config(at, tuple(w.shape), n_heads, int(ks[i]), similarity, info)
            if int(n_codes[i]) != cfg.n_codes:
                raise CheckpointError(
                    f"{prefix}: num_codes={n_codes[i]} in config.json, {cfg.n_codes} in the tensors"
                )
            site = hook.format(L=layer)
            state = {"codebook": w, "ln_weight": ln_w, "ln_bias": ln_b}
            sites.append(ConvertedSite(site, cfg, state))
    if cb_sd:
        raise CheckpointError(
            f"the checkpoint has codebook tensors that its config does not explain: "
            f"{sorted(cb_sd)[:5]}"
        )
    return sites
