"""The base model of a run: :class:`ModelConfig` (which model, which backend, dtype, device) and
:func:`load_model`, which boots it as a TransformerLens model.

A model is a Hugging Face Hub name or a local directory written by ``save_pretrained`` (config,
weights and tokenizer). Which TransformerLens class runs it:

* ``"bridge"``: ``TransformerBridge.boot_transformers`` (the only backend of transformer-lens
  4.x), either raw (the Hugging Face model's own numerics) or in compatibility mode
  (HookedTransformer's hook names and, with ``process_weights``, its weight processing);
* ``"hooked"``: a ``HookedTransformer`` (transformer-lens 3.x) over the Hugging Face weights,
  unprocessed or, with ``process_weights``, processed as ``HookedTransformer.from_pretrained``
  does (LayerNorm folded, writing weights and unembedding centered, value biases folded);
* ``"auto"``: ``"hooked"`` where transformer-lens has it and TransformerLens knows the
  architecture, else the bridge (with a warning saying why).

Names are never guessed: a name that cannot be a Hub repo id (``./m``, ``/data/m``, ``a/b/c``)
is a local path, and a missing one is an error, not a download. Remote code is never run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from codebook_lens.backends import (
    boot_hf,
    bridge_over_hf,
    hooked_over_hf,
    resolve_backend,
)
from codebook_lens.errors import BackendError
from codebook_lens.validation import ValidatedConfig

__all__ = [
    "DTYPES",
    "ModelConfig",
    "is_hub_id",
    "load_model",
    "load_tokenizer",
    "without_dropout",
    "local_model_dir",
    "resolve_device",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The ``dtype`` names :class:`ModelConfig` takes and the torch dtypes they mean."""

# Files any Hugging Face tokenizer directory holds at least one of.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# Post-norm architectures: folding or centering would change what they compute (as in
# transformer-lens 3.9's from_pretrained, which turns those steps off for them).
_POST_NORM = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")


@dataclass
class ModelConfig(ValidatedConfig):
    """Which Hugging Face causal language model a run uses and how TransformerLens boots it."""

    name: str
    """A Hugging Face Hub name (``EleutherAI/pythia-70m-deduped``) or a local directory written
    by ``model.save_pretrained`` and ``tokenizer.save_pretrained``. A name that cannot be a Hub
    repo id (``./m``, ``/abs/m``, ``runs/a/model``) is a path and is never looked up online."""

    backend: Literal["auto", "bridge", "hooked"] = "auto"
    """``"bridge"``: TransformerBridge (transformer-lens 3.x and 4.x); ``"hooked"``:
    HookedTransformer (3.x only); ``"auto"``: HookedTransformer where it exists and supports
    the architecture, else the bridge."""

    compatibility_mode: bool = False
    """Bridge only: HookedTransformer's hook names (``enable_compatibility_mode``), with its
    weight processing when ``process_weights`` is on. Off: the Hugging Face model's numerics."""

    process_weights: bool = False
    """HookedTransformer's weight processing: fold LayerNorm weights into the next layer,
    center the writing weights and the unembedding, fold value biases (``from_pretrained``
    rather than ``from_pretrained_no_processing``). Logits then differ from the Hugging Face
    model's by a constant per position (the same probabilities). The bridge processes weights
    only in compatibility mode: ``backend="bridge"`` needs ``compatibility_mode`` with it, and
    ``"auto"`` turns compatibility mode on where it boots a bridge."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the booted model."""

    device: str = "auto"
    """``"auto"`` (CUDA, then Apple MPS, then CPU) or a torch device string (``"cuda:1"``)."""

    def validate(self) -> None:
        """A name is given; the switches fit the backend; the device string parses."""
        if not self.name.strip():
            raise ValueError(
                "ModelConfig: name is empty; give a Hub name (gpt2) or a local directory"
            )
        if self.compatibility_mode and self.backend == "hooked":
            raise ValueError(
                "ModelConfig: compatibility_mode is a TransformerBridge switch; with "
                "backend='hooked' use process_weights, or set backend='bridge'"
            )
        if self.process_weights and self.backend == "bridge" and not self.compatibility_mode:
            raise ValueError(
                "ModelConfig: the bridge processes weights only in compatibility mode; set "
                "compatibility_mode=True as well, or process_weights=False"
            )
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as e:
                raise ValueError(
                    f"ModelConfig: device={self.device!r} is not a torch device; use 'auto', "
                    "'cpu', 'cuda', 'cuda:1' or 'mps'"
                ) from e


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"``: the first of CUDA, Apple MPS and CPU that is available; otherwise
    ``torch.device(spec)``, refused with ``ValueError`` when that device is not available."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r}, but torch sees no CUDA device here; use 'auto'")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={spec!r}, but there are {torch.cuda.device_count()} CUDA devices"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={spec!r}, but MPS is not available here; use 'auto'")
    return device


def is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a Hugging Face Hub repo id (``gpt2``, ``org/name``); paths
    such as ``./m``, ``/abs/m``, ``~/m`` or ``a/b/c`` cannot."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def local_model_dir(name: str) -> Path | None:
    """The local directory ``name`` refers to, or None for a Hub name. Raises
    ``FileNotFoundError`` for a path that does not exist (it is not looked up on the Hub) and
    ``ValueError`` for a file or a directory without ``config.json`` or a tokenizer."""
    path = Path(name).expanduser()
    if not path.exists():
        if is_hub_id(name):
            return None
        raise FileNotFoundError(
            f"no model directory {str(path)!r}; give the directory that model.save_pretrained "
            "wrote, or a Hugging Face Hub name such as 'gpt2' (a path is never looked up on "
            "the Hub)"
        )
    if not path.is_dir():
        raise ValueError(
            f"model {str(path)!r} is a file; give the directory that save_pretrained wrote"
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model directory {str(path)!r} has no config.json; save the model there with "
            "model.save_pretrained(dir)"
        )
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(
            f"model directory {str(path)!r} has no tokenizer (none of {list(_TOKENIZER_FILES)}); "
            "save it beside the model with tokenizer.save_pretrained(dir)"
        )
    return path


def _tokenizer(name: str, local: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local, trust_remote_code=False)
    except (OSError, ValueError) as e:
        why = f"{type(e).__name__}: {str(e)[:200]}"
        if not local:
            raise ValueError(
                f"cannot load {name!r} from the Hugging Face Hub ({why}); there is no local "
                "directory of that name either. Check the name and the connection (offline, "
                "only models in the Hub cache load), or give a local directory"
            ) from e
        raise ValueError(
            f"cannot load the tokenizer in {name!r} ({why}); save a tokenizer beside the model "
            "with tokenizer.save_pretrained(dir)"
        ) from e


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The Hugging Face tokenizer of ``cfg``'s model (its local directory, or the Hub)."""
    local = local_model_dir(cfg.name)
    return _tokenizer(str(local) if local is not None else cfg.name, local is not None)


def load_model(cfg: ModelConfig) -> nn.Module:
    """Boot the model of ``cfg`` as a TransformerLens model (``HookedTransformer`` or
    ``TransformerBridge``) in eval mode without dropout (:func:`without_dropout`), with
    ``.tokenizer`` set, on ``cfg.device`` in ``cfg.dtype``. Errors: ``FileNotFoundError`` for
    a local path that does not exist, ``ValueError`` for a directory without ``config.json``
    or tokenizer, :class:`BackendError` for a backend this transformer-lens lacks or that
    cannot run the architecture."""
    local = local_model_dir(cfg.name)
    name = str(local) if local is not None else cfg.name
    device = resolve_device(cfg.device)
    kind = resolve_backend(cfg.backend)
    if kind == "hooked" and cfg.compatibility_mode:
        kind = "bridge"  # "auto" with a bridge switch asks for the bridge
    tokenizer = _tokenizer(name, local is not None)
    if kind == "bridge":
        return without_dropout(_boot_bridge(cfg, name, tokenizer, device)).eval()
    model = _load_hooked(cfg, name, local is not None, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.to(device)  # HookedTransformer.to takes a device or a dtype, one at a time
        model.to(DTYPES[cfg.dtype])
    return without_dropout(model).eval()


def without_dropout(model: nn.Module) -> nn.Module:
    """``model`` with every dropout probability set to 0 (in place).

    TransformerLens's own models have no dropout, and a run trains on the model's deterministic
    activations whatever the backend, as SAEs are trained; it also makes a run on N processes
    equal one on a single process (each process would draw its own dropout masks)."""
    hf = getattr(model, "original_model", None)  # a bridge's HF model: not all registered
    extra = list(hf.modules()) if isinstance(hf, nn.Module) else []
    for m in [*model.modules(), *extra]:
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # Llama, NeoX attention
            m.attention_dropout = 0.0
    return model


def _bridge_options(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Compatibility mode, with weight processing as ``cfg`` asks (``process_weights`` alone
    means compatibility mode: the bridge's only way to process weights)."""
    if cfg.compatibility_mode or cfg.process_weights:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.enable_compatibility_mode(
                disable_warnings=True, no_processing=not cfg.process_weights
            )
    return model


def _boot_bridge(cfg: ModelConfig, name: str, tokenizer: Any, device: torch.device) -> nn.Module:
    """``boot_transformers`` (raw, or in compatibility mode as ``cfg`` asks)."""
    try:
        model = boot_hf(
            name, tokenizer=tokenizer, device=device, dtype=DTYPES[cfg.dtype],
            trust_remote_code=False,
        )  # fmt: skip
    except (ValueError, KeyError, NotImplementedError) as e:
        raise BackendError(
            f"TransformerBridge cannot boot {name!r} ({type(e).__name__}: {str(e)[:300]}); "
            "check that it is a causal language model of an architecture transformer-lens "
            "supports"
        ) from e
    return _bridge_options(model, cfg)


def _load_hooked(cfg: ModelConfig, name: str, local: bool, tokenizer: Any) -> nn.Module:
    """A HookedTransformer over the Hugging Face weights (read in float32 on the CPU),
    processed if asked; with ``backend="auto"``, the bridge over the same weights when
    TransformerLens cannot build a HookedTransformer for them."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        name, local_files_only=local, trust_remote_code=False
    ).eval()
    try:
        model = hooked_over_hf(hf, name, tokenizer)
    except BackendError as e:
        if cfg.backend != "auto":
            raise
        warnings.warn(f"{e}; booting it as a TransformerBridge instead", stacklevel=3)
        return _bridge_options(bridge_over_hf(hf, name, tokenizer), cfg)
    if cfg.process_weights:
        _process_hooked(model)
    return model


def _process_hooked(model: nn.Module) -> None:
    """``HookedTransformer.from_pretrained``'s weight processing, applied in place."""
    post_norm = getattr(model.cfg, "original_architecture", None) in _POST_NORM
    softcap = (getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.process_weights_(
            fold_ln=not post_norm, center_writing_weights=not post_norm,
            center_unembed=not softcap,
        )  # fmt: skip
