"""The two TransformerLens generations in one place.

transformer-lens 3.x has ``HookedTransformer`` and ``TransformerBridge``; 4.x has only the
bridge. This module builds models from a TransformerLens config on either (``"hooked"``: a
``HookedTransformer``; ``"bridge"``: ``TransformerBridge.boot_native``), boots Hugging Face
models, says which backend a model is, and saves and loads base models so that a checkpoint
written on one generation loads on the other: native weights are translated between the
``HookedTransformer`` layout (``blocks.0.attn.W_Q`` ``[head, d_model, d_head]``) and the
bridge's ``nn.Linear`` layout (``blocks.0.attn.q.weight`` ``[head * d_head, d_model]``).
Nothing else in the package imports ``HookedTransformer``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal

import einops
import torch
from torch import Tensor, nn

from codebook_lens.errors import BackendError

__all__ = [
    "BACKENDS",
    "Backend",
    "backend_of",
    "boot_hf",
    "bridge_over_hf",
    "build_model",
    "estimated_params",
    "has_hooked_transformer",
    "hooked_over_hf",
    "hooked_to_native",
    "native_to_hooked",
    "resolve_backend",
    "tl_version",
]

Backend = Literal["auto", "hooked", "bridge"]
BACKENDS: tuple[str, ...] = ("auto", "hooked", "bridge")


def tl_version() -> str:
    """The installed transformer-lens version string."""
    from importlib.metadata import version

    return version("transformer-lens")


@cache
def has_hooked_transformer() -> bool:
    """Whether the installed transformer-lens still has ``HookedTransformer`` (3.x, not 4.x)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str = "auto") -> Literal["hooked", "bridge"]:
    """``"auto"`` becomes ``"hooked"`` where transformer-lens has it (3.x, where SAELens
    works) and ``"bridge"`` otherwise (4.x); an explicit choice is checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "hooked" if has_hooked_transformer() else "bridge"
    if backend == "hooked" and not has_hooked_transformer():
        raise BackendError(
            f"backend='hooked' needs HookedTransformer, which transformer-lens {tl_version()} "
            "no longer has; use backend='bridge' (or 'auto'), or install 'transformer-lens<4'"
        )
    return backend  # type: ignore[return-value]


def backend_of(model: nn.Module) -> Literal["hooked", "bridge"]:
    """``"bridge"`` for a ``TransformerBridge``, ``"hooked"`` for a ``HookedTransformer`` (or
    another ``HookedRootModule`` with a ``hook_dict``)."""
    names = {c.__name__ for c in type(model).__mro__}
    if "TransformerBridge" in names:
        return "bridge"
    if "HookedTransformer" in names or hasattr(model, "hook_dict"):
        return "hooked"
    raise TypeError(
        "expected a transformer_lens HookedTransformer or TransformerBridge, got "
        f"{type(model).__name__}; build one with codebook_lens.backends.build_model(cfg) or "
        "TransformerBridge.boot_transformers(name)"
    )


# --------------------------------------------------------------------------- configs
# Saved-config fields that never change the computation (or must not be obeyed on load: a
# checkpoint is data, so it may not name a tokenizer or remote code to run).
_METADATA = frozenset(
    {
        "model_name", "n_params", "seed", "device", "n_devices", "tokenizer_name",
        "trust_remote_code", "original_architecture", "architecture", "from_checkpoint",
        "checkpoint_index", "checkpoint_label_type", "checkpoint_value", "init_mode",
        "init_weights", "initializer_range", "dtype", "load_in_4bit", "quantization_method",
        "train_seq_length", "tokenizer_prepends_bos", "tokenizer_appends_eos",
        "default_prepend_bos", "default_padding_side", "use_hook_tokens", "use_hook_mlp_in",
        "use_attn_in", "use_split_qkv_input", "ungroup_grouped_query_attention", "n_ctx_orig",
    }
)  # fmt: skip

# HookedTransformerConfig defaults that the 4.x bridge config lacks but computes the same way.
_NEUTRAL = {
    "attention_dir": "causal",
    "use_attn_scale": True,
    "rotary_base": 10000,
    "rotary_scaling_factor": 1.0,
    "NTK_original_ctx_len": 8192,
    "yarn_factor": 1.0,
    "yarn_attention_factor": 1.0,
    "yarn_beta_fast": 32.0,
    "yarn_beta_slow": 1.0,
    "yarn_original_max_position_embeddings": 4096,
    "yarn_truncate": True,
}


def _is_neutral(key: str, value: Any, cfg: Mapping[str, Any]) -> bool:
    if key in _METADATA or value is None or value is False:
        return True
    if isinstance(value, (list, tuple, dict)) and not value:
        return True
    if key == "attn_scale" and cfg.get("d_head"):
        return math.isclose(float(value), math.sqrt(cfg["d_head"]))
    if key == "d_vocab_out":
        return value in (-1, cfg.get("d_vocab"))
    if key == "rotary_dim" and cfg.get("positional_embedding_type") != "rotary":
        return True
    return key in _NEUTRAL and value == _NEUTRAL[key]


def _config_class(backend: str) -> type:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend == "hooked":
            from transformer_lens import HookedTransformerConfig

            return HookedTransformerConfig
        from transformer_lens.config import TransformerBridgeConfig

        return TransformerBridgeConfig


def _fields(backend: str) -> set[str]:
    """Fields the backend's config class takes (its ``__init__`` and dataclass fields)."""
    cls = _config_class(backend)
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    params = inspect.signature(cls.__init__).parameters.values()
    names |= {
        p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY
    }
    return names - {"self"}


def _check_native_fit(config: Mapping[str, Any], source: str | None) -> None:
    """Refuse features that the native bridge ignores or computes differently."""
    if config.get("parallel_attn_mlp") and source != "bridge":
        raise BackendError(
            "parallel_attn_mlp=True (attention and MLP in parallel) is not implemented by the "
            "native TransformerBridge, which would silently run them in sequence; use "
            "backend='hooked' on transformer-lens 3.x"
        )
    if source != "hooked":
        return
    rotary = config.get("positional_embedding_type") == "rotary"
    if rotary and not config.get("rotary_adjacent_pairs"):
        raise BackendError(
            "this HookedTransformer rotates halves of each head (rotary_adjacent_pairs=False); "
            "the native TransformerBridge rotates adjacent pairs, so its heads would differ. "
            "Load it with backend='hooked' on transformer-lens 3.x"
        )


def translate_config(
    config: Mapping[str, Any], backend: str, source: str | None = None
) -> dict[str, Any]:
    """``config`` (a ``to_dict()`` of either generation's config) restricted to what
    ``backend``'s config class takes. Metadata (names, devices, ``trust_remote_code``,
    ``tokenizer_name``) is dropped; a field that would change the computation and has no
    counterpart raises :class:`BackendError` naming it."""
    if backend == "bridge":
        _check_native_fit(config, source)
    fields = _fields(backend)
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in _METADATA:
            continue
        if key in fields:
            out[key] = value
        elif not _is_neutral(key, value, config):
            raise BackendError(
                f"the saved model config sets {key}={value!r}, which a {backend} model on "
                f"transformer-lens {tl_version()} cannot represent; load it on the "
                "transformer-lens version it was saved with"
            )
    if isinstance(out.get("dtype"), str):
        out["dtype"] = getattr(torch, out["dtype"])
    if out.get("d_vocab_out") == -1:
        out.pop("d_vocab_out")
    if (
        source == "bridge"
        and backend == "hooked"
        and out.get("positional_embedding_type") == "rotary"
    ):
        out["rotary_adjacent_pairs"] = True  # the native bridge's rotary layout
    if source == "bridge" and backend == "hooked":
        out["parallel_attn_mlp"] = False  # the native bridge runs them in sequence
    return out


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's TransformerLens config as JSON-ready data (dtypes as strings, no device)."""
    d = model.cfg.to_dict()
    d = {
        k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in d.items()
    }
    d.pop("device", None)
    json.dumps(d)  # fail here, before anything is written
    return d


# --------------------------------------------------------------------------- building
def build_model(
    config: Mapping[str, Any] | Any,
    backend: str = "auto",
    tokenizer: Any = None,
    source: str | None = None,
) -> nn.Module:
    """A randomly initialised TransformerLens model from a config (a dict of
    ``HookedTransformerConfig`` / ``TransformerBridgeConfig`` fields, or either config object).

    ``backend``: ``"hooked"`` (``HookedTransformer``, transformer-lens 3.x), ``"bridge"``
    (``TransformerBridge.boot_native``) or ``"auto"`` (:func:`resolve_backend`). ``seed`` in the
    config seeds the initialisation on both. ``source`` names the backend the config comes
    from when it is a saved model's (for the features the two compute differently). Returns the
    model in eval mode.
    """
    kind = resolve_backend(backend)
    src = dict(config if isinstance(config, Mapping) else config.to_dict())
    cfg = translate_config(src, kind, source)
    seed = src.get("seed")
    if seed is not None and "seed" in _fields(kind):
        cfg["seed"] = seed
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        if seed is not None:
            torch.manual_seed(seed)
        if kind == "hooked":
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            model = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=tokenizer)
        else:
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_native(cfg, tokenizer=tokenizer)
    return model.eval()


def boot_hf(name_or_dir: str | os.PathLike, tokenizer: Any = None, **kwargs: Any) -> nn.Module:
    """``TransformerBridge.boot_transformers`` with the tokenizer loaded from the same local
    directory when none is given (a tokenizer object built in memory makes transformer-lens 4.3
    fail with ``KeyError: 'name_or_path'``). ``kwargs`` go to ``boot_transformers``."""
    from transformer_lens.model_bridge import TransformerBridge

    path = Path(name_or_dir)
    if tokenizer is None and path.is_dir() and (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_transformers(str(name_or_dir), tokenizer=tokenizer, **kwargs)
    return model.eval()


# --------------------------------------------------------------------------- weights
Convert = Callable[[Tensor, Mapping[str, Any]], Tensor]


def _heads(cfg: Mapping[str, Any], kv: bool) -> int:
    return (cfg.get("n_key_value_heads") or cfg["n_heads"]) if kv else cfg["n_heads"]


def _w_in(kv: bool) -> tuple[Convert, Convert]:
    """(hooked -> native, native -> hooked) for W_Q/W_K/W_V ``[head, d_model, d_head]``."""
    return (
        lambda t, c: einops.rearrange(t, "h m d -> (h d) m"),
        lambda t, c: einops.rearrange(t, "(h d) m -> h m d", h=_heads(c, kv)),
    )


def _b_in(kv: bool) -> tuple[Convert, Convert]:
    return (
        lambda t, c: einops.rearrange(t, "h d -> (h d)"),
        lambda t, c: einops.rearrange(t, "(h d) -> h d", h=_heads(c, kv)),
    )


_SAME: tuple[Convert, Convert] = (lambda t, c: t, lambda t, c: t)
_T: tuple[Convert, Convert] = (lambda t, c: t.T.contiguous(), lambda t, c: t.T.contiguous())

# (HookedTransformer suffix, bridge suffix, converters); the first match wins.
_WEIGHT_MAP: list[tuple[str, str, tuple[Convert, Convert]]] = [
    ("attn.W_Q", "attn.q.weight", _w_in(False)),
    ("attn.W_K", "attn.k.weight", _w_in(True)),
    ("attn.W_V", "attn.v.weight", _w_in(True)),
    ("attn._W_K", "attn.k.weight", _w_in(True)),  # grouped-query attention's raw parameters
    ("attn._W_V", "attn.v.weight", _w_in(True)),
    ("attn.b_Q", "attn.q.bias", _b_in(False)),
    ("attn.b_K", "attn.k.bias", _b_in(True)),
    ("attn.b_V", "attn.v.bias", _b_in(True)),
    ("attn._b_K", "attn.k.bias", _b_in(True)),
    ("attn._b_V", "attn.v.bias", _b_in(True)),
    (
        "attn.W_O",
        "attn.o.weight",
        (
            lambda t, c: einops.rearrange(t, "h d m -> m (h d)"),
            lambda t, c: einops.rearrange(t, "m (h d) -> h d m", h=c["n_heads"]),
        ),
    ),
    ("attn.b_O", "attn.o.bias", _SAME),
    ("mlp.W_in", "mlp.in.weight", _T),
    ("mlp.b_in", "mlp.in.bias", _SAME),
    ("mlp.W_gate", "mlp.gate.weight", _T),
    ("mlp.b_gate", "mlp.gate.bias", _SAME),
    ("mlp.W_out", "mlp.out.weight", _T),
    ("mlp.b_out", "mlp.out.bias", _SAME),
    ("unembed.W_U", "unembed.weight", _T),
    ("unembed.b_U", "unembed.bias", _SAME),
    ("pos_embed.W_pos", "pos_embed.weight", _SAME),
    ("embed.W_E", "embed.weight", _SAME),
    (".w", ".weight", _SAME),
    (".b", ".bias", _SAME),
]
# Buffers each side recomputes from its config.
_BUFFERS = (".mask", ".IGNORE", "rotary_sin", "rotary_cos", "causal_mask", "_cached")


def _convert(
    sd: Mapping[str, Tensor], cfg: Mapping[str, Any], to_native: bool
) -> dict[str, Tensor]:
    src, dst = (0, 1) if to_native else (1, 0)
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        if key.endswith(_BUFFERS) or "_original_component" in key:
            continue
        for entry in _WEIGHT_MAP:
            if key.endswith(entry[src]):
                out[key[: -len(entry[src])] + entry[dst]] = entry[2][src](t, cfg)
                break
        else:
            raise BackendError(
                f"cannot translate weight {key!r} between HookedTransformer and the native "
                "bridge; load the checkpoint on the transformer-lens version it was saved with"
            )
    return out


def hooked_to_native(sd: Mapping[str, Tensor], cfg: Mapping[str, Any]) -> dict[str, Tensor]:
    """A ``HookedTransformer`` state dict in the native bridge's layout (``cfg``: the model's
    config as a dict)."""
    return _convert(sd, cfg, to_native=True)


def native_to_hooked(sd: Mapping[str, Tensor], cfg: Mapping[str, Any]) -> dict[str, Tensor]:
    """A native ``TransformerBridge`` state dict in the ``HookedTransformer`` layout."""
    out = _convert(sd, cfg, to_native=False)
    if cfg.get("n_key_value_heads"):  # HookedTransformer's grouped-query attention
        out = {re.sub(r"attn\.(W|b)_([KV])$", r"attn._\1_\2", k): v for k, v in out.items()}
    return out


# --------------------------------------------------------------------------- saving
HF_DIR = "hf_model"
"""Folder (inside a checkpoint) with a Hugging Face-booted bridge's config and tokenizer."""


def is_hf_bridge(model: nn.Module) -> bool:
    """Whether ``model`` is a bridge over a Hugging Face model (not a native one)."""
    arch = getattr(model.cfg, "architecture", None)
    return backend_of(model) == "bridge" and arch not in (None, "TransformerLensNative")


def model_spec(model: nn.Module) -> dict[str, Any]:
    """What rebuilds ``model``'s architecture, as JSON-ready data: ``backend``, ``source``
    (``"native"``: a TransformerLens config in ``config``; ``"hf"``: a Hugging Face config
    written by :func:`write_hf_config`) and ``compatibility_mode``."""
    if is_hf_bridge(model):
        return {
            "backend": "bridge",
            "source": "hf",
            "compatibility_mode": bool(getattr(model, "compatibility_mode", False)),
        }
    return {"backend": backend_of(model), "source": "native", "config": config_dict(model)}


def write_hf_config(model: nn.Module, directory: Path) -> None:
    """Write a Hugging Face-booted bridge's ``config.json`` and tokenizer to ``directory``;
    its weights go beside it in the bridge's own layout (``model.state_dict()``)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.original_model.config.save_pretrained(str(directory))
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save_pretrained(str(directory))


def _positive_ints(cfg: Mapping[str, Any], *keys: str) -> list[int] | None:
    """The first present value of each alias group ``"a|b"``, if all are positive ints."""
    out = []
    for group in keys:
        value = next((cfg[k] for k in group.split("|") if cfg.get(k) is not None), None)
        if type(value) is not int or value < 1:
            return None
        out.append(value)
    return out


def estimated_params(spec: Mapping[str, Any], path: Path) -> int | None:
    """An upper-bound-style estimate of the parameter count that the saved config describes
    (embeddings, attention and MLP weights), or None when its sizes are not plain ints."""
    if spec.get("source", "native") == "hf":
        try:
            cfg = json.loads((path / HF_DIR / "config.json").read_text())
        except (OSError, ValueError):
            return None
        dims = _positive_ints(
            cfg, "vocab_size", "hidden_size|n_embd|d_model", "num_hidden_layers|n_layer"
        )
        if dims is None or not isinstance(cfg, dict):
            return None
        vocab, d, layers = dims
        inter = (_positive_ints(cfg, "intermediate_size|n_inner|ffn_dim") or [4 * d])[0]
        pos = (_positive_ints(cfg, "max_position_embeddings|n_positions") or [0])[0]
        return 2 * vocab * d + pos * d + layers * (4 * d * d + 3 * d * inter)
    cfg = spec.get("config")
    dims = None if not isinstance(cfg, Mapping) else _positive_ints(
        cfg, "d_vocab", "d_model", "n_layers", "n_ctx", "n_heads", "d_head"
    )  # fmt: skip
    if dims is None:
        return None
    vocab, d, layers, ctx, heads, d_head = dims
    d_mlp = (_positive_ints(cfg, "d_mlp") or [0])[0]
    return 2 * vocab * d + ctx * d + layers * (4 * heads * d_head * d + 3 * d * d_mlp)


def rebuild_model(
    spec: Mapping[str, Any], path: Path, backend: str = "auto", n_saved: int | None = None
) -> nn.Module:
    """A model with the architecture of :func:`model_spec` output (saved at ``path``) and
    random weights, on ``backend`` (a native model moves between backends; a Hugging Face one
    is always a bridge). Never runs code from ``path`` nor reaches the network. With
    ``n_saved`` (the number of saved weight elements), a config that describes a model far
    larger than its weights is refused before anything is allocated."""
    est = estimated_params(spec, path) if n_saved is not None else None
    if est is not None and est > 4 * n_saved + 2**20:
        raise BackendError(
            f"the saved config describes a model of about {est:,} parameters, but the saved "
            f"weights hold {n_saved:,} values; the config does not belong to these weights"
        )
    if spec.get("source", "native") == "hf":
        if resolve_backend("bridge" if backend == "auto" else backend) != "bridge":
            raise BackendError(
                "a Hugging Face-booted model loads as a bridge; use backend='bridge'"
            )
        model = boot_hf(path / HF_DIR, load_weights=False, trust_remote_code=False)
        if spec.get("compatibility_mode"):
            model.enable_compatibility_mode()
        return model
    if backend == "auto" and spec["backend"] == "bridge":
        backend = "bridge"  # keep the saved backend where it exists
    return build_model(spec["config"], backend, source=spec["backend"])


def load_weights(model: nn.Module, sd: dict[str, Tensor], spec: Mapping[str, Any]) -> None:
    """Load ``sd`` (saved from the model that :func:`model_spec` described as ``spec``) into
    ``model``, translating the layout when the backends differ. Raises :class:`BackendError`
    when the weights do not fit: a parameter the target lacks must be all zeros (e.g. the
    biases of a gated MLP, which the native bridge does not have)."""
    target, saved = backend_of(model), spec["backend"]
    if spec.get("source", "native") == "hf":
        model.load_state_dict(sd, strict=True)
        return
    cfg = spec["config"]
    if target != saved:
        sd = hooked_to_native(sd, cfg) if target == "bridge" else native_to_hooked(sd, cfg)
    own = model.state_dict()
    nonzero = [k for k in sd if k not in own and sd[k].count_nonzero()]
    if nonzero:
        raise BackendError(
            f"the saved weights {nonzero[:5]} have no place in this {target} model (a "
            f"{saved} feature the {target} backend lacks)"
        )
    missing, _ = model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    missing = [m for m in missing if not m.endswith(_BUFFERS) and "_original_component" not in m]
    with torch.no_grad():  # a bias the source model does not have is a zero bias
        for name in [m for m in missing if m.rsplit(".", 1)[-1].lstrip("_").startswith("b")]:
            own[name].zero_()
            missing.remove(name)
    if missing:
        raise BackendError(f"the saved weights lack {missing[:5]} for this {target} model")


# --------------------------------------------------------------------------- in-memory HF models
def bridge_over_hf(hf_model: nn.Module, name: str, tokenizer: Any) -> nn.Module:
    """A TransformerBridge over an in-memory Hugging Face model (raw HF numerics: no
    compatibility mode, whose weight processing shifts the logits by a per-position constant).
    ``tokenizer`` is needed: load it from a directory (``AutoTokenizer.from_pretrained``)."""
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer is None:
        raise BackendError(
            f"no tokenizer for the model {name!r}; pass tokenizer=... (a tokenizer loaded "
            "from a directory with AutoTokenizer.from_pretrained)"
        )
    device = next(hf_model.parameters()).device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            name or "converted", hf_model=hf_model, tokenizer=tokenizer, device=device
        )
    return bridge.eval()


def hooked_over_hf(hf_model: nn.Module, name: str, tokenizer: Any) -> nn.Module:
    """A HookedTransformer (transformer-lens 3.x) over ``hf_model``'s weights, with no weight
    processing (no LayerNorm folding or centering), so that activations and logits match HF.
    ``name`` is the model's directory or official Hub name, from which TransformerLens reads the
    config (``HookedTransformer.from_pretrained`` only takes official names). Raises
    :class:`BackendError` when TransformerLens cannot build it."""
    resolve_backend("hooked")
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    device = next(hf_model.parameters()).device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = loading.get_pretrained_model_config(name, device=device)
            sd = loading.get_pretrained_state_dict(name, cfg, hf_model)
            model = HookedTransformer(cfg, tokenizer)
            model.load_and_process_state_dict(
                sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
                fold_value_biases=False, refactor_factored_attn_matrices=False,
            )  # fmt: skip
        except (
            ValueError,
            KeyError,
            AttributeError,
            NotImplementedError,
            OSError,
            RuntimeError,
        ) as e:  # AttributeError: 3.9 guesses some configs from the name ("llama", "gemma")
            raise BackendError(
                f"TransformerLens cannot load {name!r} as a HookedTransformer that fits these "
                f"weights ({str(e)[:300]}); use backend='bridge'"
            ) from e
    return model.to(device).eval()
