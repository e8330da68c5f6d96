"""The rows of a Neuronpedia export: names of sources and source sets, and one JSON-ready dict
per model, release, source set, source, feature and activation record.

The field names, types and defaults follow Neuronpedia's own exporter
(``utils/neuronpedia-utils/neuronpedia_utils/db_models/*.py`` and
``convert-saedashboard-to-neuronpedia-export.py`` in github.com/hijohnnylin/neuronpedia, which
write ``dataclass.__dict__``), checked against the tables of ``apps/webapp/prisma/schema.prisma``
there, which its importer (``apps/webapp/app/api/admin/import/route.ts``) fills. Model, release,
source set and source rows go through Prisma's ``create`` (no unknown keys allowed); feature
(``Neuron``) and activation rows are inserted with ``jsonb_to_recordset`` over the table's own
columns, so the extra ``codebook_lens`` key each of them carries here (which code, where it
fired) is ignored by the import and kept for other readers.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

__all__ = [
    "DEFAULT_CREATOR_ID",
    "EXTRA_KEY",
    "activation_id",
    "activation_record",
    "feature_record",
    "layer_string",
    "model_id_for",
    "model_record",
    "release_record",
    "site_kind",
    "source_record",
    "source_set_record",
]

DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"
"""The user Neuronpedia's database seed creates (``apps/webapp/prisma/seed.ts``) and its
exporters default to: the creator of imported rows on a local instance."""

EXTRA_KEY = "codebook_lens"
"""The key of the codebook facts in feature and activation rows (ignored by the import)."""

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_EMBED_SITES = {"hook_embed": "embed", "hook_pos_embed": "pos-embed"}


def model_id_for(name: str) -> str:
    """A Neuronpedia model id (lowercase letters, digits, ``-`` and ``_``; at most 128) from a
    model's Hub name or directory: its last part (``EleutherAI/pythia-70m`` -> ``pythia-70m``)."""
    last = re.split(r"[\\/]", name.rstrip("/\\"))[-1]
    mid = re.sub(r"[^a-z0-9_-]+", "-", last.lower()).strip("-")[:128]
    return mid or "model"


def layer_string(site: str) -> str:
    """The layer part of a source id: the block number, or ``e`` for embedding sites (as
    Neuronpedia names them); a ValueError for other sites."""
    m = _BLOCK.fullmatch(site)
    if m:
        return m.group(1)
    if site in _EMBED_SITES:
        return "e"
    raise ValueError(
        f"{site} is neither inside a block (blocks.<layer>....) nor an embedding; Neuronpedia "
        "names every source by its layer, so export the block sites (--site)"
    )


def site_kind(site: str) -> str:
    """The hook of ``site`` without its layer, as a name part: ``blocks.3.hook_mlp_out`` ->
    ``mlp-out``, ``blocks.0.attn.hook_z`` -> ``attn-z``."""
    m = _BLOCK.fullmatch(site)
    hook = m.group(2) if m else _EMBED_SITES.get(site, site)
    return re.sub(r"[^a-z0-9]+", "-", hook.lower().replace("hook_", "")).strip("-")


def activation_id(model_id: str, source_id: str, index: int, rank: int) -> str:
    """A stable 25-character id of one activation record (Neuronpedia uses cuids; the import
    skips an id it already has, so exporting the same run twice adds nothing twice)."""
    digest = hashlib.sha256(f"{model_id}/{source_id}/{index}/{rank}".encode()).hexdigest()
    return "c" + digest[:24]


def _common(creator_id: str, created_at: str, visibility: str) -> dict[str, Any]:
    return {"creatorId": creator_id, "createdAt": created_at, "visibility": visibility}


def model_record(
    model_id: str, name: str, cfg: Any, creator_id: str, created_at: str, visibility: str
) -> dict[str, Any]:
    """The ``Model`` row: the model's id, its name, layers and sizes from its config."""
    return {
        "id": model_id,
        "instruct": False,
        **_common(creator_id, created_at, visibility),
        "displayNameShort": model_id,
        "displayName": name,
        "tlensId": None,
        "dimension": int(cfg.d_model),
        "defaultSourceSetName": None,
        "defaultSourceId": None,
        "inferenceEnabled": False,
        "layers": int(cfg.n_layers),
        "neuronsPerLayer": int(getattr(cfg, "d_mlp", None) or 0),
        "owner": name.split("/")[0] if "/" in name and not name.startswith("/") else "",
        "updatedAt": created_at,
        "website": None,
    }


def release_record(
    name: str, title: str, creator_name: str, creator_id: str, created_at: str, visibility: str
) -> dict[str, Any]:
    """The ``SourceRelease`` row."""
    return {
        "name": name,
        "description": title,
        "creatorName": creator_name,
        **_common(creator_id, created_at, visibility),
        "isNewUi": False,
        "featured": False,
        "descriptionShort": title,
        "urls": [],
        "creatorEmail": None,
        "creatorNameShort": creator_name,
        "defaultSourceSetName": None,
        "defaultSourceId": None,
        "defaultUmapSourceIds": [],
    }


def source_set_record(
    model_id: str, name: str, description: str, release: str, creator_name: str, common: dict
) -> dict[str, Any]:
    """The ``SourceSet`` row (``common``: creatorId, createdAt, visibility)."""
    return {
        "modelId": model_id,
        "name": name,
        **common,
        "hasDashboards": True,
        "description": description,
        "type": "",
        "creatorName": creator_name,
        "urls": [],
        "creatorEmail": None,
        "releaseName": release,
        "defaultOfModelId": None,
        "defaultRange": 1,
        "defaultShowBreaks": True,
        "showDfa": False,
        "showCorrelated": False,
        "showHeadAttribution": False,
        "showUmap": False,
    }


def source_record(
    model_id: str, source_id: str, set_name: str, store_shape: tuple[int, int], dataset: str | None,
    notes: str, common: dict,
) -> dict[str, Any]:  # fmt: skip
    """The ``Source`` row; ``store_shape`` is the store's (sequences, tokens per sequence)."""
    return {
        "id": source_id,
        "modelId": model_id,
        "setName": set_name,
        **common,
        "hasDashboards": True,
        "inferenceEnabled": False,
        "inferenceHosts": [],
        "saelensConfig": None,
        "saelensRelease": None,
        "saelensSaeId": None,
        "hfRepoId": None,
        "hfFolderId": None,
        "defaultOfModelId": None,
        "hasUmap": False,
        "hasUmapLogSparsity": False,
        "hasUmapClusters": False,
        "num_prompts": int(store_shape[0]),
        "num_tokens_in_prompt": int(store_shape[1]),
        "dataset": dataset,
        "notes": notes,
    }


_EMPTY_FEATURE_LISTS = (
    "vector topkCosSimIndices topkCosSimValues neuron_alignment_indices neuron_alignment_values "
    "neuron_alignment_l1 correlated_neurons_indices correlated_neurons_pearson "
    "correlated_neurons_l1 correlated_features_indices correlated_features_pearson "
    "correlated_features_l1 logits_hist_data_bar_heights logits_hist_data_bar_values "
    "decoder_weights_dist"
).split()


def feature_record(
    where: dict[str, str], index: int, density: float, max_act: float, logits: dict[str, list],
    activation_hist: tuple[list[float], list[float]], extra: dict[str, Any], common: dict,
) -> dict[str, Any]:  # fmt: skip
    """One ``Neuron`` row. ``where``: modelId, layer (the source id), sourceSetName;
    ``logits``: pos_str, pos_values, neg_str, neg_values; ``activation_hist``: (bar heights,
    bar values) of the feature's nonzero activations; ``common``: creatorId, createdAt."""
    rec: dict[str, Any] = {
        "modelId": where["modelId"],
        "layer": where["layer"],
        "index": str(index),
        "creatorId": common["creatorId"],
        "createdAt": common["createdAt"],
        "maxActApprox": float(max_act),
        "hasVector": False,
        "vectorLabel": None,
        "vectorDefaultSteerStrength": 10.0,
        "hookName": None,
        **{key: [] for key in _EMPTY_FEATURE_LISTS},
        **logits,
        "frac_nonzero": float(density),
        "freq_hist_data_bar_heights": activation_hist[0],
        "freq_hist_data_bar_values": activation_hist[1],
        "sourceSetName": where["sourceSetName"],
        EXTRA_KEY: extra,
    }
    return rec


def activation_record(
    where: dict[str, str], index: int, rank: int, tokens: list[str], values: list[float],
    fired_at: int, seq: int, extra: dict[str, Any], creator_id: str, created_at: str,
) -> dict[str, Any]:  # fmt: skip
    """One ``Activation`` row: a context window's token strings and the feature's value at
    each; ``fired_at`` is the window index of the firing that chose this window (the maximum:
    every firing has the same value), ``seq`` the store sequence (``dataIndex``)."""
    return {
        "id": activation_id(where["modelId"], where["layer"], index, rank),
        "tokens": tokens,
        "index": str(index),
        "layer": where["layer"],
        "modelId": where["modelId"],
        "maxValue": float(max(values)),
        "maxValueTokenIndex": int(fired_at),
        "minValue": float(min(values)),
        "values": values,
        "creatorId": creator_id,
        "dataSource": None,
        "dataIndex": str(seq),
        "dfaValues": [],
        "dfaTargetIndex": None,
        "dfaMaxValue": None,
        "createdAt": created_at,
        "lossValues": [],
        "logitContributions": None,
        "binMin": None,
        "binMax": None,
        "binContains": None,
        "qualifyingTokenIndex": int(fired_at),
        "zIndices": None,
        "zValues": None,
        EXTRA_KEY: extra,
    }
