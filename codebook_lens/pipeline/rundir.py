"""The run directory: one documented layout that every step of a run reads and fills.

::

    RUN/
      run.json          format marker, the resolved run config, library versions, step status
      train/            the training checkpoint (exact resume: model, codebooks, optimizer, RNG,
                        data position, history)
      metrics.jsonl     one JSON line per logged training step (evaluation metrics included)
      model/            CodebookModel.save(include_model=True): load with CodebookModel.load
      evaluation.json   the evaluation (codebook_lens.evaluation.Evaluation.to_dict())
      store/            the code store written by ``collect``
      report.html       training curves and evaluation tables

A directory is a run when it holds ``run.json`` with the run format marker; nothing else is
ever written into a directory that holds other data.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from codebook_lens.atomic import holds_data, write_text
from codebook_lens.errors import CheckpointError

__all__ = ["RunDir", "RUN_FORMAT", "library_versions"]

RUN_FORMAT = "codebook_lens.run"
_RUN_VERSION = 1
_PACKAGES = ("codebook-lens", "transformer-lens", "torch", "transformers", "datasets", "accelerate")


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries a run depends on (absent ones as ``"-"``)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (see the module docstring for the layout)."""

    path: Path
    """The run directory."""

    @property
    def run_file(self) -> Path:
        """``run.json``: config, versions and status."""
        return self.path / "run.json"

    @property
    def train_dir(self) -> Path:
        """The training checkpoint directory."""
        return self.path / "train"

    @property
    def metrics(self) -> Path:
        """The metric history, JSON lines."""
        return self.path / "metrics.jsonl"

    @property
    def model_dir(self) -> Path:
        """The trained CodebookModel with its base model."""
        return self.path / "model"

    @property
    def evaluation(self) -> Path:
        """The evaluation, JSON."""
        return self.path / "evaluation.json"

    @property
    def store(self) -> Path:
        """The code store."""
        return self.path / "store"

    @property
    def report(self) -> Path:
        """The HTML report."""
        return self.path / "report.html"

    # ------------------------------------------------------------------ run.json
    def is_run(self) -> bool:
        """Whether the directory holds a run (a readable ``run.json`` of this format)."""
        try:
            self.read()
        except (CheckpointError, FileNotFoundError):
            return False
        return True

    def read(self) -> dict[str, Any]:
        """The parsed ``run.json``; ``CheckpointError`` when it is not a run file."""
        if not self.run_file.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a run directory (no run.json); create one with "
                "`codebook-lens train CONFIG --out DIR`"
            )
        try:
            doc = json.loads(self.run_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.run_file} is not valid JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT:
            raise CheckpointError(
                f"{self.run_file} is not a codebook_lens run file (format marker "
                f"{RUN_FORMAT!r} missing)"
            )
        if doc.get("version") != _RUN_VERSION or not isinstance(doc.get("config"), dict):
            raise CheckpointError(
                f"{self.run_file}: unsupported run version {doc.get('version')!r} or no config; "
                f"this codebook_lens reads version {_RUN_VERSION}"
            )
        doc.setdefault("status", {})
        return doc

    def config_dict(self) -> dict[str, Any]:
        """The saved run config, as a dict."""
        return self.read()["config"]

    def status(self) -> dict[str, Any]:
        """Which steps finished (``{"train": {...}, "evaluate": {...}, ...}``)."""
        return dict(self.read()["status"])

    def write(self, config: dict[str, Any], status: dict[str, Any] | None = None) -> None:
        """Write ``run.json`` atomically (config, current library versions, status)."""
        doc = {
            "format": RUN_FORMAT,
            "version": _RUN_VERSION,
            "config": config,
            "versions": library_versions(),
            "status": status or {},
        }
        write_text(self.run_file, json.dumps(doc, indent=2, sort_keys=False) + "\n")

    def mark(self, step: str, **info: Any) -> None:
        """Record that ``step`` finished, with ``info`` (JSON values)."""
        doc = self.read()
        status = dict(doc["status"])
        status[step] = info
        self.write(doc["config"], status)

    # ------------------------------------------------------------------ creation
    def check(self, config: dict[str, Any], resume: bool) -> bool:
        """Whether training with ``config`` here resumes a run (True) or starts one (False);
        raises ``ValueError`` naming the fix when it may do neither. Writes nothing.

        A new or empty directory may become a run. An existing run is resumed only with
        ``resume=True`` and the same config (training settings that change the result must not
        differ); any other non-empty directory is refused, so nothing is overwritten."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} exists and is not a directory; choose another --out")
        if self.run_file.exists():
            saved = self.config_dict()
            if not resume:
                raise ValueError(
                    f"{self.path} already holds a run; pass --resume to continue it, or choose "
                    "another --out"
                )
            _same_config(saved, config, self.path)
            return True
        if holds_data(self.path):
            raise ValueError(
                f"{self.path} is not empty and holds no run (no run.json); refusing to write "
                "into it. Choose a new or empty --out directory"
            )
        return False

    def prepare(self, config: dict[str, Any], resume: bool) -> bool:
        """:meth:`check`, then make a new run's directory and ``run.json``; return whether
        it resumes."""
        if self.check(config, resume):
            return True
        os.makedirs(self.path, exist_ok=True)
        self.write(config)
        return False


# Fields that may differ between an interrupted run and its resumption.
_MAY_DIFFER = {"out", ("train", "progress"), ("train", "steps")}


def _same_config(saved: dict[str, Any], new: dict[str, Any], path: Path) -> None:
    """Refuse resuming ``saved`` with a ``new`` config that changes the result."""
    diffs = []
    for key in sorted(set(saved) | set(new)):
        if key in _MAY_DIFFER:
            continue
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if (key, sub) not in _MAY_DIFFER and a.get(sub) != b.get(sub):
                    diffs.append(f"{key}.{sub}: {a.get(sub)!r} -> {b.get(sub)!r}")
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    if diffs:
        raise ValueError(
            f"cannot resume {path}: the config differs from the saved run in "
            f"{'; '.join(diffs)}. Resume with the saved config (codebook-lens train --resume "
            f"--out {path}) or start a new run"
        )
