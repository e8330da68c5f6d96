"""`RunConfig`: every setting of one run (model, data, sites, training, evaluation, collection),
read from a TOML, YAML or JSON file and overridden by command-line flags.

A config file mirrors the dataclasses; site groups are ``[[sites]]`` tables::

    out = "runs/pythia70m-attn"

    [model]
    name = "EleutherAI/pythia-70m-deduped"

    [data]
    path = "roneneldan/TinyStories"
    context_len = 256
    batch_size = 32

    [[sites]]
    pattern = "blocks.*.attn.hook_z"
    n_codes = 10000
    k = 8

    [train]
    steps = 20000
    lr = 1e-4
    codebook_lr = 1e-3
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codebook_lens.pipeline.models import ModelConfig
from codebook_lens.pipeline.sites import SiteGroup
from codebook_lens.pipeline.sources import DataConfig
from codebook_lens.training import TrainConfig
from codebook_lens.validation import ValidatedConfig

__all__ = ["RunConfig", "load_config_file", "CONFIG_SUFFIXES"]

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")
"""File types :func:`load_config_file` reads."""

# Set by the pipeline from the run directory; a config must leave them unset.
_PIPELINE_OWNED = ("checkpoint_dir", "metrics_path")


def _default_train() -> TrainConfig:
    return TrainConfig(
        steps=1000,
        lr=1e-4,
        codebook_lr=1e-3,
        warmup_steps=50,
        log_every=50,
        checkpoint_every=200,
        freeze_model=True,
    )


@dataclass
class RunConfig(ValidatedConfig):
    """One run: a Hugging Face model, a text dataset, codebook sites, and how to train,
    evaluate and collect. ``train_run(cfg)`` (or ``codebook-lens train``) writes everything
    into :attr:`out`."""

    model: ModelConfig
    """The base model: a Hub name or a local ``save_pretrained`` directory, and how to boot it."""

    data: DataConfig
    """The text (or pre-tokenized) dataset, its held-out part, context and batch size."""

    sites: list[SiteGroup] = field(default_factory=list)
    """Site groups: a hook-name pattern and the codebook fields of every site it matches."""

    out: str = "run"
    """The run directory (created; an existing run is continued only with resume)."""

    train: TrainConfig = field(default_factory=_default_train)
    """Training (:class:`~codebook_lens.training.TrainConfig`). A run trains the codebooks on
    the frozen model by default (``freeze_model=True``, as an SAE is trained); set it False to
    finetune the model with them, as in the paper. ``checkpoint_dir`` and ``metrics_path`` are
    the run directory's and must stay unset here."""

    init_batches: int = 4
    """Training batches whose activations initialise the codebooks (their ``init`` method)."""

    collect_tokens: int = 1_000_000
    """Tokens whose codes ``collect`` stores (``--tokens`` overrides)."""

    collect_batch_size: int = 32
    """Sequences per forward pass when collecting codes."""

    seed: int = 0
    """Seeds torch before the model's codebooks are built."""

    report: bool = True
    """Write ``report.html`` (training curves and evaluation tables) after training."""

    def validate(self) -> None:
        """Sizes positive, pipeline-owned training fields unset, site patterns distinct."""
        for name in ("init_batches", "collect_tokens", "collect_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunConfig: {name} must be >= 1, got {getattr(self, name)}")
        if not self.out.strip():
            raise ValueError("RunConfig: out is empty; give the run directory")
        for name in _PIPELINE_OWNED:
            if getattr(self.train, name) is not None:
                raise ValueError(
                    f"RunConfig: train.{name} is set by the run directory; leave it unset"
                )
        bad = [g for g in self.sites if not isinstance(g, SiteGroup)]
        if bad:
            raise TypeError(
                f"RunConfig: sites must be SiteGroup objects (or tables in a file), got "
                f"{type(bad[0]).__name__}"
            )
        want = _steps_for_tokens(self.data, self.train.grad_accum)
        if want is not None and self.train.steps != want:
            raise ValueError(
                f"RunConfig: data.train_tokens={self.data.train_tokens} is {want} steps of "
                f"{self.train.grad_accum} x {self.data.batch_size} x {self.data.context_len} "
                f"tokens, but train.steps={self.train.steps}; give one of them (in a config file "
                "or on the command line, train.steps follows train_tokens when it is not given)"
            )
        patterns = [g.pattern for g in self.sites]
        if len(set(patterns)) != len(patterns):
            raise ValueError(f"RunConfig: site patterns repeat: {patterns}; merge those groups")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (site groups as their fields)."""
        d = super().to_dict()
        d["sites"] = [g.to_dict() for g in self.sites]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Build from a dict (a parsed config file); ``sites`` tables become SiteGroups."""
        if not isinstance(d, Mapping):
            raise TypeError(f"RunConfig: expected a table of fields, got {type(d).__name__}")
        d = dict(d)
        sites = d.get("sites", [])
        if not isinstance(sites, list):
            raise TypeError(
                f"RunConfig: sites must be a list of tables ([[sites]] in TOML), got "
                f"{type(sites).__name__}"
            )
        d["sites"] = [g if isinstance(g, SiteGroup) else SiteGroup.from_dict(g) for g in sites]
        given = d.get("train", {})
        if isinstance(given, Mapping):  # a [train] table changes the run's defaults, field by field
            d["train"] = train = {**_default_train().to_dict(), **given}
            data = d.get("data")
            if isinstance(data, Mapping) and data.get("train_tokens") is not None:
                if "steps" not in given:  # the steps follow the tokens to train on
                    steps = _steps_for_tokens(DataConfig.from_dict(data), train["grad_accum"])
                    train["steps"] = steps
        return super().from_dict(d)


def _steps_for_tokens(data: DataConfig, grad_accum: int) -> int | None:
    """Optimizer steps covering ``data.train_tokens`` (None when it is not set)."""
    if data.train_tokens is None:
        return None
    return math.ceil(data.train_tokens / (grad_accum * data.batch_size * data.context_len))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The parsed contents of a TOML, YAML or JSON config file (a dict; build a
    :class:`RunConfig` with ``RunConfig.from_dict``). Data only: YAML is read with
    ``safe_load``."""
    path = Path(path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise ValueError(
            f"config file {path} has suffix {path.suffix!r}; use one of {CONFIG_SUFFIXES}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    text = path.read_text(encoding="utf-8")
    try:
        doc = _parse(path.suffix, text)
    except ValueError as e:
        raise ValueError(f"config file {path} does not parse: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"config file {path} must hold a table of fields, got {type(doc)}")
    return doc


_YAML12_FLOAT = re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?(?:[eE][-+]?\d+)$|^[-+]?\d[\d_]*\.\d*$")


def _parse(suffix: str, text: str) -> Any:
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser as a package
            import tomli as tomllib

        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text)
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML 1.2 floats: PyYAML (YAML 1.1) reads ``1e-3`` as the string '1e-3'."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))
    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader: data only
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from e
