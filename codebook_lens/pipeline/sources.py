"""The data of a run: :class:`DataConfig` (which dataset, held-out part, context and batch size)
and :class:`TokenSource`, which turns it into token batches for training, evaluation and code
collection.

Where the documents come from (:func:`find_data` decides, without the network for local paths):

* a Hugging Face Hub dataset name (``roneneldan/TinyStories``), with ``name`` (its config),
  ``split`` and ``streaming``;
* local files: one file, a directory (searched recursively) or a glob of ``.txt`` (a document
  per line, per paragraph or per file: ``sample_by``), ``.jsonl`` / ``.json``, ``.parquet``,
  ``.csv`` or ``.arrow`` files, all of one kind, read with ``datasets.load_dataset(<kind>,
  data_files=...)``;
* a ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``) directory, read memory-mapped
  with ``datasets.load_from_disk``.

Text documents are tokenized with the model's tokenizer and packed as
:class:`~codebook_lens.data.BlockStream` packs them: each document followed by EOS, the stream
cut into ``context_len`` blocks that each start with BOS. An already-tokenized column
(``tokens_column``, e.g. SAELens's ``input_ids``/``tokens``) is used as it is: rows are
concatenated without adding anything (they hold whatever their tokenizer added) and cut into
``context_len`` blocks, so rows made at the run's context (as SAELens pretokenizes) come back
unchanged, one block each; shorter rows share blocks and longer ones continue in the next
block. The incomplete tail of a pass is dropped; no token is padding.

Held-out documents: ``eval_split`` (or separate files, ``eval_path``) when given, else a share
``eval_fraction`` of the documents, chosen by a seeded hash of each document's position
(:func:`held_out_mask`): deterministic, the same on a streaming and a map-style read, and the
training stream never contains them.
"""

from __future__ import annotations

import glob
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor, nn

from codebook_lens.data import (
    BlockStream,
    global_batches,
    hf_texts,
    iter_blocks,
    shuffle_groups,
)
from codebook_lens.pipeline.models import is_hub_id
from codebook_lens.validation import Range, ValidatedConfig

__all__ = [
    "BUILDERS",
    "DataConfig",
    "TokenSource",
    "check_context",
    "find_data",
    "held_out_mask",
    "load_split",
]

BUILDERS: dict[str, str] = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
"""Local file suffixes and the ``datasets`` builder that reads them."""

_GLOB_CHARS = frozenset("*?[")
_TOKEN_COLUMNS = ("input_ids", "tokens")


@dataclass
class DataConfig(ValidatedConfig):
    """Which documents a run reads, which of them are held out, and how they are batched."""

    path: str
    """A Hugging Face Hub dataset name, or a local file, directory or glob (``data/*.jsonl``)
    of ``.txt``, ``.jsonl``/``.json``, ``.parquet``, ``.csv`` or ``.arrow`` files, or a
    ``save_to_disk`` directory. A name that cannot be a Hub id is a path, never looked up
    online."""

    name: str | None = None
    """The Hub dataset's configuration (``wikitext-103-raw-v1``); None for the default."""

    split: str = "train"
    """The split to train on (local data files have only ``train``)."""

    streaming: bool = False
    """Read the documents as they are iterated instead of preparing the whole dataset first
    (Hub datasets and local data files; ``save_to_disk`` directories are always read in place,
    memory-mapped)."""

    text_column: str = "text"
    """The column holding the documents' text (``.txt`` files give ``text``)."""

    tokens_column: str | None = None
    """An already-tokenized column (``input_ids`` or ``tokens``, as SAELens accepts) to use
    instead of text: no tokenizer runs, rows are concatenated as they are and cut into
    ``context_len`` blocks."""

    sample_by: Literal["line", "paragraph", "document"] = "line"
    """What one document of a ``.txt`` file is: a line, a paragraph (blank-line separated) or
    the whole file."""

    eval_split: str | None = None
    """A held-out split to evaluate on (of ``eval_path`` when given, else of ``path``); when
    neither is set, ``eval_fraction`` of the documents are held out instead."""

    eval_path: str | None = None
    """Held-out documents in a separate dataset (the same kinds as ``path``)."""

    eval_fraction: float = 0.01
    """Share of the documents held out for evaluation when there is no ``eval_split`` or
    ``eval_path``: chosen by a hash of each document's position and ``seed``."""

    context_len: int = 128
    """Tokens per sequence (at most the model's ``n_ctx``)."""

    batch_size: int = 32
    """Sequences per optimizer step, over all processes together (the global batch)."""

    shuffle_buffer: int = 1024
    """Blocks mixed in the shuffle buffer of the training stream (0 or 1: document order)."""

    seed: int = 0
    """Seeds the held-out choice and the training shuffle (a new order each epoch)."""

    train_tokens: int | None = None
    """Tokens to train on: a run's ``train.steps`` follows from it (``ceil(train_tokens /
    (grad_accum x batch_size x context_len))``) when not given. None: ``train.steps`` decides."""

    eval_tokens: int = 65_536
    """Held-out tokens that evaluation uses (rounded up to whole sequences)."""

    RANGES: ClassVar[dict[str, Range]] = {
        "context_len": Range(2, 2**20),
        "batch_size": Range(1, 2**20),
        "shuffle_buffer": Range(0, 2**24),
        "eval_fraction": Range(0, 1, lo_open=True, hi_open=True),
        "train_tokens": Range(1, 2**62),
        "eval_tokens": Range(1, 2**40),
        "seed": Range(0, 2**32 - 1),  # times 1_000_003 plus the epoch seeds torch
    }
    """Bounds of the numeric fields (checked with the types, before :meth:`validate`)."""

    def validate(self) -> None:
        """A path is given; held-out sources are consistent."""
        if not self.path.strip():
            raise ValueError("DataConfig: path is empty; give a Hub dataset name or local files")
        if self.eval_split is not None and self.eval_path is None and self.eval_split == self.split:
            raise ValueError(
                f"DataConfig: eval_split={self.eval_split!r} is the training split; training "
                "would see the evaluation documents. Give another split, or leave it unset to "
                "hold out eval_fraction of the documents"
            )


# ---------------------------------------------------------------------- finding the data
def _one_kind(files: list[Path], where: str) -> tuple[str, list[str]]:
    kinds = {BUILDERS[f.suffix.lower()] for f in files}
    if not files:
        raise FileNotFoundError(
            f"no data files in {where}; give .txt, .jsonl, .json, .parquet, .csv or .arrow "
            "files (or a save_to_disk directory)"
        )
    if len(kinds) > 1:
        raise ValueError(
            f"{where} mixes data files of kinds {sorted(kinds)}; give files of one kind (a glob "
            "such as 'dir/*.jsonl' picks them)"
        )
    return kinds.pop(), [str(f) for f in files]


def find_data(path: str) -> tuple[str, list[str]]:
    """What ``path`` names: ``("hub", [path])``, ``("disk", [dir])`` for a ``save_to_disk``
    directory, or ``(builder, files)`` for local data files (builder: a ``datasets`` builder
    name from :data:`BUILDERS`; files sorted). A missing path or a glob that matches no file
    raises ``FileNotFoundError`` (paths are never looked up on the Hub)."""
    p = Path(path).expanduser()
    if _GLOB_CHARS & set(path):
        found = [Path(f) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
        if not found:
            raise FileNotFoundError(f"no files match {path!r}")
        return _one_kind([f for f in found if f.suffix.lower() in BUILDERS], repr(path))
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return "disk", [str(p)]
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS)
        return _one_kind(files, f"directory {str(p)!r}")
    if p.is_file():
        if p.suffix.lower() not in BUILDERS:
            raise ValueError(
                f"{str(p)!r} is not a data file this reads; give {sorted(BUILDERS)} files"
            )
        return BUILDERS[p.suffix.lower()], [str(p)]
    if p.suffix.lower() in BUILDERS or not is_hub_id(path):
        raise FileNotFoundError(
            f"no such file or directory: {path!r} (a path is never looked up on the Hugging "
            "Face Hub; give an existing path or a Hub dataset name)"
        )
    return "hub", [path]


def _pick_split(ds: Any, split: str, where: str) -> Any:
    """The ``split`` of a DatasetDict (a Dataset has only one split, and is returned)."""
    if not hasattr(ds, "keys"):
        return ds
    if split not in ds:
        raise ValueError(f"{where} has no split {split!r}; its splits are {sorted(ds.keys())}")
    return ds[split]


def load_split(cfg: DataConfig, path: str, split: str) -> Any:
    """The ``split`` of dataset ``path`` read as ``cfg`` says (``datasets`` ``Dataset``, or
    ``IterableDataset`` when streaming). Local files are read without the network."""
    import datasets

    kind, files = find_data(path)
    if kind == "disk":
        return _pick_split(datasets.load_from_disk(files[0]), split, f"{path!r}")
    if kind != "hub":
        if split != "train":
            raise ValueError(
                f"local data files have one split, 'train', not {split!r}; put held-out "
                "documents in other files and give them as eval_path"
            )
        extra = {"sample_by": cfg.sample_by} if kind == "text" else {}
        try:
            return datasets.load_dataset(
                kind, data_files=files, split="train", streaming=cfg.streaming, **extra
            )
        except datasets.exceptions.DatasetGenerationError as e:
            cause = e.__cause__ or e
            raise ValueError(
                f"cannot read {path!r} as {kind} files ({type(cause).__name__}: "
                f"{str(cause)[:300]}); check that the files are not empty and hold {kind} data"
            ) from e
    try:
        return datasets.load_dataset(path, cfg.name, split=split, streaming=cfg.streaming)
    except Exception as e:  # not found, offline, a bad config or split: all the user's to fix
        raise ValueError(
            f"could not load the Hub dataset {path!r} (name={cfg.name!r}, split={split!r}): "
            f"{type(e).__name__}: {str(e)[:300]}. Check the name, config and split, or give "
            "local files"
        ) from e


# ---------------------------------------------------------------------- held-out documents
def held_out_mask(index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each document position in ``index`` (non-negative ints) is held out: a
    splitmix64 hash of ``index`` and ``seed``, below ``fraction`` of its range. Independent
    per document, so a share ``fraction`` in expectation, the same on every read."""
    with np.errstate(over="ignore"):
        z = np.asarray(index, dtype=np.uint64) + np.uint64(
            ((seed + 1) * 0x9E3779B97F4A7C15) % 2**64
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)) < np.uint64(int(fraction * 2**53))


def _split_by_mask(ds: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """(training, held-out) documents of ``ds`` by :func:`held_out_mask`."""
    if hasattr(ds, "select"):  # map-style: index arrays, no document is read
        held = held_out_mask(np.arange(len(ds)), fraction, seed)
        return ds.select(np.flatnonzero(~held)), ds.select(np.flatnonzero(held))

    def keep(want: bool) -> Callable[[Any, list[int]], list[bool]]:
        def fn(batch: Any, idx: list[int]) -> list[bool]:
            return (held_out_mask(np.asarray(idx), fraction, seed) == want).tolist()

        return fn

    return (
        ds.filter(keep(False), with_indices=True, batched=True),
        ds.filter(keep(True), with_indices=True, batched=True),
    )


def _columns(ds: Any) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names is None:  # a streaming dataset whose features are not declared: look at a row
        first = next(iter(ds), None)
        names = list(first) if first is not None else []
    return list(names)


def _check_column(ds: Any, cfg: DataConfig, where: str) -> None:
    column = cfg.tokens_column or cfg.text_column
    names = _columns(ds)
    if column in names:
        return
    field = "tokens_column" if cfg.tokens_column else "text_column"
    hint = ""
    tokenized = [c for c in _TOKEN_COLUMNS if c in names]
    if not cfg.tokens_column and tokenized:
        hint = f"; it looks tokenized: set tokens_column={tokenized[0]!r}"
    raise ValueError(
        f"the dataset {where} has no column {column!r}; its columns are {names}. Set "
        f"{field} to one of them{hint}"
    )


def _token_rows(ds: Any, column: str) -> Iterator[list[int]]:
    """The non-empty rows of an already-tokenized column, in order."""
    for batch in ds.iter(batch_size=1000):
        for row in batch[column]:
            if isinstance(row, str):
                raise ValueError(
                    f"tokens_column {column!r} holds text, not token ids; set text_column="
                    f"{column!r} and tokens_column=None"
                )
            if len(row):
                yield row


def _take(groups: Iterable[Tensor], n_blocks: int, context_len: int) -> Tensor:
    """The first ``n_blocks`` blocks of ``groups`` (fewer if they run out), reading no further."""
    got: list[Tensor] = []
    n = 0
    for g in groups:
        got.append(g[: n_blocks - n])
        n += got[-1].shape[0]
        if n >= n_blocks:
            break
    return torch.cat(got) if got else torch.empty(0, context_len, dtype=torch.long)


class TokenSource:
    """Token batches of a :class:`DataConfig`, all ``[rows, context_len]`` LongTensors.

    >>> source = TokenSource(cfg.data, model.tokenizer)
    >>> batches = source.train_batches()        # endless, shuffled, never held-out documents
    >>> held_out = source.eval_batches()        # fixed: the same list on every call

    The datasets are opened (and their columns checked) on construction; tokens are read
    lazily. ``tokenizer`` is the model's (``model.tokenizer``); it may be None only with
    ``tokens_column``.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any = None):
        if cfg.tokens_column is None and tokenizer is None:
            raise ValueError(
                "a text dataset needs the model's tokenizer (TokenSource(cfg, model.tokenizer)); "
                "or give already-tokenized data with tokens_column"
            )
        self.cfg = cfg
        self.tokenizer = tokenizer
        train = load_split(cfg, cfg.path, cfg.split)
        _check_column(train, cfg, repr(cfg.path))
        if cfg.eval_path is not None or cfg.eval_split is not None:
            where = cfg.eval_path or cfg.path
            held = load_split(cfg, where, cfg.eval_split or cfg.split)
            _check_column(held, cfg, repr(where))
        else:
            train, held = _split_by_mask(train, cfg.eval_fraction, cfg.seed)
        self.train_data = train
        """The training documents (a ``datasets`` dataset; never a held-out one)."""
        self.eval_data = held
        """The held-out documents."""
        self._eval: list[Tensor] | None = None
        self._enough = False

    def _groups(self, ds: Any) -> Iterator[Int[Tensor, "n context_len"]]:
        """Groups of consecutive blocks of one pass over ``ds``, in document order."""
        cfg = self.cfg
        if cfg.tokens_column is not None:
            rows = _token_rows(ds, cfg.tokens_column)
            return (g[0] for g in iter_blocks(rows, cfg.context_len))
        texts = hf_texts(ds, cfg.text_column)
        return BlockStream(texts, self.tokenizer, cfg.context_len, batch_size=1).blocks()

    def _check_one_batch(self) -> None:
        cfg = self.cfg
        if self._enough:
            return
        n = _take(self._groups(self.train_data), cfg.batch_size, cfg.context_len).shape[0]
        if n < cfg.batch_size:
            raise ValueError(
                f"the training documents of {cfg.path!r} give {n} sequence(s) of "
                f"{cfg.context_len} tokens, fewer than one batch of {cfg.batch_size}; give more "
                "data, or lower batch_size or context_len"
            )
        self._enough = True

    def train_batches(
        self, rank: int = 0, world_size: int = 1
    ) -> Iterator[Int[Tensor, "batch context_len"]]:
        """Endless training batches: the training documents packed into blocks, shuffled
        through ``shuffle_buffer`` blocks (a new order each epoch), in global batches of
        ``batch_size``; with ``world_size > 1`` only rank ``rank``'s rows of each
        (:func:`~codebook_lens.data.shard_batch`). Every call starts from the beginning, so
        skipping ``n`` batches resumes exactly. ``ValueError`` if the documents do not fill
        one batch."""
        cfg = self.cfg
        self._check_one_batch()
        if cfg.tokens_column is None:
            texts = lambda: hf_texts(self.train_data, cfg.text_column)  # noqa: E731
            stream = BlockStream(
                texts, self.tokenizer, cfg.context_len, cfg.batch_size,
                shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, repeat=True, rank=rank,
                world_size=world_size,
            )  # fmt: skip
            return iter(stream)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        return self._token_batches(rank, world_size)

    def _token_batches(self, rank: int, world_size: int) -> Iterator[Tensor]:
        cfg = self.cfg
        epoch = 0
        while True:  # one epoch per pass; _check_one_batch made sure a pass fills a batch
            groups = shuffle_groups(
                self._groups(self.train_data), cfg.shuffle_buffer, cfg.seed, epoch
            )
            yield from global_batches(groups, cfg.batch_size, rank, world_size)
            epoch += 1

    def eval_batches(self) -> list[Int[Tensor, "_batch context_len"]]:
        """The held-out batches: ``ceil(eval_tokens / context_len)`` blocks of held-out
        documents in document order (no shuffle), in batches of ``batch_size`` (the last may
        be smaller). Computed once: every call returns the same tensors. ``ValueError`` when
        the held-out documents give fewer tokens."""
        cfg = self.cfg
        if self._eval is None:
            n_blocks = math.ceil(cfg.eval_tokens / cfg.context_len)
            blocks = _take(self._groups(self.eval_data), n_blocks, cfg.context_len)
            if blocks.shape[0] < n_blocks:
                raise ValueError(
                    f"the held-out documents give {blocks.shape[0] * cfg.context_len} tokens "
                    f"({blocks.shape[0]} sequences of {cfg.context_len}), fewer than "
                    f"eval_tokens={cfg.eval_tokens}; lower eval_tokens, raise eval_fraction, or "
                    "give a larger eval_split / eval_path"
                )
            self._eval = list(blocks.split(cfg.batch_size))
        return list(self._eval)

    def collect_batches(
        self, n_tokens: int, batch_size: int | None = None
    ) -> Iterator[Int[Tensor, "_batch context_len"]]:
        """Batches for code collection: the first ``ceil(n_tokens / context_len)`` blocks of
        the training documents in document order (no shuffle, one pass), ``batch_size`` rows
        each (default the config's; the last may be smaller). Warns when the documents run out
        first.

        Why the training side: a code store needs far more text than the held-out share holds
        (``eval_fraction`` of the data), and what a code page shows (which tokens fire a code)
        is a property of the codebook's nearest-code lookup on the data's distribution; a
        codebook's few vectors per site cannot memorise the documents it was trained on, as
        a held-out comparison would guard against. The held-out documents stay unseen by
        training and collection alike, for evaluation. Shard across processes by batch index
        (``itertools.islice(batches, rank, None, world_size)``)."""
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        rows = batch_size or self.cfg.batch_size
        n_blocks = math.ceil(n_tokens / self.cfg.context_len)
        return self._collect(n_blocks, rows)

    def _collect(self, n_blocks: int, rows: int) -> Iterator[Tensor]:
        ctx = self.cfg.context_len
        pending: list[Tensor] = []
        n = done = 0
        for g in self._groups(self.train_data):
            pending.append(g[: n_blocks - done - n])  # never more blocks than asked for
            n += pending[-1].shape[0]
            while n >= rows:
                pool = torch.cat(pending)
                yield pool[:rows]
                pending, n, done = [pool[rows:]], n - rows, done + rows
            if done + n == n_blocks:
                break
        if n:
            yield torch.cat(pending)
            done += n
        if done < n_blocks:
            warnings.warn(
                f"the training documents gave {done * ctx} tokens ({done} sequences), fewer "
                f"than the {n_blocks * ctx} asked for",
                stacklevel=2,
            )


def check_context(cfg: DataConfig, model: nn.Module) -> None:
    """Refuse a ``context_len`` longer than ``model``'s context (``model.cfg.n_ctx``), and text
    data for a model without a tokenizer, with ``ValueError`` naming the fix."""
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if n_ctx is not None and cfg.context_len > n_ctx:
        raise ValueError(
            f"context_len={cfg.context_len} is longer than the model's context (n_ctx={n_ctx}); "
            f"set data.context_len to at most {n_ctx}"
        )
    if cfg.tokens_column is None and getattr(model, "tokenizer", None) is None:
        raise ValueError(
            "the model has no tokenizer to tokenize the text with; load it with its tokenizer, "
            "or give already-tokenized data with tokens_column"
        )
