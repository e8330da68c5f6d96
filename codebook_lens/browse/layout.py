"""What ``codebook-lens browse DIR`` reads from DIR, and :func:`write_browse_data` that writes it.

Layout written by :func:`write_browse_data` (the demos call it)::

    DIR/browse/browse.json           manifest: kind, vocab strings, label names, relative paths
    DIR/browse/store/                a CodeStore over the evaluation set (with tokens)
    DIR/browse/labels.safetensors    one label per stored position (-1 = none), if any
    DIR/bookmarks.json               written by the browser (atomically)

The manifest's paths (model, tokenizer) are relative to DIR and must stay inside it. An
experiment describes itself there: label names, the token texts and, for digit-unit prompts
(TokFSM), the prompt format (:class:`~codebook_lens.digit_units.DigitPrompts`), so the browser
imports no experiment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codebook_lens.analysis.store import CodeStore
from codebook_lens.atomic import DirKind, open_dir, save_dir
from codebook_lens.digit_units import DigitPrompts
from codebook_lens.errors import CheckpointError
from codebook_lens.io import MODEL_KIND
from codebook_lens.tensor_files import read_tensors, write_tensors
from codebook_lens.tokenizer_files import TOKENIZER_KIND, load_tokenizer

__all__ = [
    "BROWSE_FORMAT",
    "BROWSE_KIND",
    "BrowseData",
    "write_browse_data",
    "load_browse_data",
    "inside",
]

BROWSE_FORMAT = "codebook_lens.browse"
_VERSION = 1
BROWSE_KIND = DirKind(
    name="browse directory",
    head="browse.json",
    format=BROWSE_FORMAT,
    tag="browse",
    saver="write_browse_data",
)
"""The on-disk kind of ``DIR/browse`` (for :mod:`codebook_lens.atomic`)."""


def inside(root: Path, rel: str | os.PathLike[str]) -> Path:
    """``root / rel`` resolved, or a CheckpointError if it leaves ``root`` (``..``, absolute
    paths, symlinks out)."""
    root = root.resolve()
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise CheckpointError(f"{rel!r} points outside {root}; browse reads only files under DIR")
    return p


def write_browse_data(
    out_dir: str | os.PathLike[str],
    store: CodeStore,
    *,
    labels: Tensor | None = None,
    label_names: Sequence[str] | None = None,
    vocab: Sequence[str] | None = None,
    kind: str = "generic",
    model: str | None = "model",
    tokenizer: str | None = None,
    prompts: DigitPrompts | None = None,
) -> Path:
    """Write what ``codebook-lens browse out_dir`` needs to ``out_dir/browse``; return that path.

    Args:
        out_dir: The demo's output directory (DIR).
        store: Codes over the evaluation set, with tokens.
        labels: One label per stored position ``[n_seq, pos]`` (-1 = none), e.g. TokFSM states
            or ``lm-demo`` topics.
        label_names: A name per label id (default: ``"0"``, ``"1"``, ...).
        vocab: The text of each token id (default: the id as text).
        kind: ``"fsm"`` (TokFSM: digit prompts, next-state distributions), ``"lm"`` or
            ``"generic"``.
        model: Path of the saved CodebookModel, relative to ``out_dir`` (None: none).
        tokenizer: Path of a saved tokenizer, relative to ``out_dir``.
        prompts: The digit-unit prompt format (TokFSM): the Lab tokenizes digit prompts and
            shows the next-unit distribution.
    """
    if not store.has_tokens:
        raise ValueError("the browser needs the store's tokens; collect it with keep_tokens=True")
    if kind not in ("fsm", "lm", "generic"):
        raise ValueError(f"kind={kind!r}; choose 'fsm', 'lm' or 'generic'")
    out = Path(out_dir)
    labels, names = _checked_labels(store, labels, label_names)
    d_vocab = _d_vocab(store)
    vocab = list(vocab) if vocab is not None else [str(i) for i in range(d_vocab)]
    manifest = {
        "format": BROWSE_FORMAT,
        "version": _VERSION,
        "kind": kind,
        "vocab": [str(v) for v in vocab],
        "label_names": names if labels is not None else [],
        "model": model,
        "tokenizer": tokenizer,
        "prompts": None if prompts is None else prompts.to_dict(),
    }

    def write(tmp: Path) -> None:
        store.save(tmp / "store")
        if labels is not None:
            write_tensors(
                {"labels": labels.to(torch.int32)}, tmp / "labels.safetensors", BROWSE_FORMAT
            )

    save_dir(out / "browse", BROWSE_KIND, manifest, write)
    return out / "browse"


def _d_vocab(store: CodeStore) -> int:
    """The store's vocabulary size: recorded, else one past its largest token (read chunk by
    chunk, so a disk store is not loaded whole)."""
    if store.d_vocab is not None:
        return int(store.d_vocab)
    if not store.has_tokens:
        return 0
    return 1 + max((int(t.max()) for _, t in store.token_chunks() if t.numel()), default=-1)


def _checked_labels(
    store: CodeStore, labels: Tensor | None, label_names: Sequence[str] | None
) -> tuple[Tensor | None, list[str]]:
    """``labels`` as long ``[n_seq, pos]`` like the store, and a name per label id."""
    n_labels = 0
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        if tuple(labels.shape) != (store.n_seq, store.seq_len):
            raise ValueError(
                f"labels {tuple(labels.shape)} must be [n_seq, pos] = "
                f"{[store.n_seq, store.seq_len]} like the store"
            )
        n_labels = int(labels.max()) + 1 if labels.numel() else 0
    names = list(label_names) if label_names is not None else [str(i) for i in range(n_labels)]
    if len(names) < n_labels:
        raise ValueError(f"{len(names)} label names for labels up to {n_labels - 1}")
    return labels, names


@dataclass
class BrowseData:
    """Everything the browser serves from one DIR (the model is loaded on first use)."""

    root: Path
    """DIR, resolved."""
    store: CodeStore
    """The code store."""
    vocab: list[str]
    """Text of each token id."""
    kind: str = "generic"
    """``"fsm"``, ``"lm"`` or ``"generic"``."""
    labels: Tensor | None = None
    """Labels ``[n_seq, pos]`` (long, -1 = none), or None."""
    label_names: list[str] = field(default_factory=list)
    """Name of each label id."""
    model_path: Path | None = None
    """Saved CodebookModel directory, if any."""
    tokenizer_path: Path | None = None
    """Saved tokenizer directory, if any."""
    prompts: DigitPrompts | None = None
    """The digit-unit prompt format (TokFSM), if any."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """``DIR/metrics.json`` when present."""

    @property
    def bookmarks_path(self) -> Path:
        """Where bookmarks are written."""
        return self.root / "bookmarks.json"


def _opt(root: Path, rel: str | None) -> Path | None:
    return None if rel is None else inside(root, rel)


def _labels(file: Path, cs: CodeStore) -> Tensor | None:
    """The stored labels ``[n_seq, pos]`` (long), checked, or None without a labels file."""
    if not file.exists():
        return None
    t = read_tensors(file).get("labels")
    if t is None or t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise CheckpointError(f"{file} needs an integer tensor 'labels'")
    if tuple(t.shape) != (cs.n_seq, cs.seq_len):
        raise CheckpointError(
            f"{file}: labels have shape {tuple(t.shape)}, the store is {(cs.n_seq, cs.seq_len)}"
        )
    return t.long()


def _prompts(d: Any, file: Path) -> DigitPrompts | None:
    """The manifest's digit prompt format, checked (None when it has none)."""
    if d is None:
        return None
    try:
        return DigitPrompts.from_dict(d, str(file))
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e


def _vocab_from_tokenizer(path: Path | None, d_vocab: int) -> list[str] | None:
    if path is None or not any(
        (path / f).exists() for f in ("tokenizer.json", TOKENIZER_KIND.head)
    ):
        return None

    tok = load_tokenizer(path)
    return [tok.decode([i]) for i in range(d_vocab)]


def _hf_vocab(model_dir: Path, d_vocab: int) -> list[str] | None:
    """Token texts from the Hugging Face tokenizer saved with a CodebookModel, if any."""
    with open_dir(model_dir, MODEL_KIND) as (_meta, data):
        hf = data / "hf_model"
        if not (hf / "tokenizer_config.json").exists():
            return None
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    return [tok.decode([i]) for i in range(d_vocab)]


def _load_run_dir(root: Path, model: str | os.PathLike[str] | None) -> BrowseData:
    """A run directory (``codebook-lens train``): ``RUN/store`` from ``collect``, ``RUN/model``,
    and ``RUN/evaluation.json`` as the metrics shown."""
    if not (root / "store").exists():
        raise CheckpointError(
            f"{root} is a run without a code store; run `codebook-lens collect {root}` first"
        )
    cs = CodeStore.open(root / "store", verify=True)
    mp = Path(model).resolve() if model is not None else root / "model"
    d_vocab = _d_vocab(cs)
    vocab = _hf_vocab(mp, d_vocab) if (mp / MODEL_KIND.head).exists() else None
    ev = root / "evaluation.json"
    return BrowseData(
        root=root,
        store=cs,
        vocab=vocab or [str(i) for i in range(d_vocab)],
        kind="lm",
        model_path=mp,
        metrics={"evaluation": _read_json(ev)} if ev.exists() else {},
    )


def load_browse_data(
    root: str | os.PathLike[str],
    store: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
) -> BrowseData:
    """Read DIR: a run directory (``codebook-lens train``, then ``collect``), ``DIR/browse/``
    as written by :func:`write_browse_data`, or an explicit
    ``store`` (a saved CodeStore) and ``model`` (a saved CodebookModel) given by the user."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory")
    if store is None and (root / "run.json").exists():
        return _load_run_dir(root, model)
    man_path = root / "browse" / "browse.json"
    if store is None and not man_path.exists():
        if (root / "store.json").exists():
            store = root
        else:
            raise CheckpointError(
                f"{root} has no browse/browse.json; re-run `codebook-lens demo` / `lm-demo` "
                "(they write it), or pass --store STORE [--model MODEL]"
            )
    if store is not None:
        cs = CodeStore.open(store, verify=True)
        mp = Path(model).resolve() if model is not None else None
        d_vocab = _d_vocab(cs)
        vocab = _vocab_from_tokenizer(mp / "tokenizer" if mp else None, d_vocab)
        return BrowseData(root, cs, vocab or [str(i) for i in range(d_vocab)], model_path=mp)
    with open_dir(root / "browse", BROWSE_KIND) as (man, data):
        cs = CodeStore.open(data / "store", verify=True)
        labels = _labels(data / "labels.safetensors", cs)
    metrics = _read_json(root / "metrics.json") if (root / "metrics.json").exists() else {}
    mp = _opt(root, man.get("model"))
    return BrowseData(
        root=root,
        store=cs,
        vocab=list(man["vocab"]),
        kind=man.get("kind", "generic"),
        labels=labels,
        label_names=list(man.get("label_names", [])),
        model_path=Path(model).resolve() if model is not None else mp,
        tokenizer_path=_opt(root, man.get("tokenizer")),
        prompts=_prompts(man.get("prompts"), root / "browse" / BROWSE_KIND.head),
        metrics=metrics,
    )
