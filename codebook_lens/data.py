"""Text data for language models: sources, tokenization, packing into blocks, streaming.

The pipeline is ``texts -> token ids -> one long stream -> blocks of block_len -> batches``:

* documents come from a Hugging Face ``datasets`` dataset (:func:`hf_texts`, map-style or
  streaming), local text files (:func:`file_texts`) or the Python documentation that ships with
  CPython (:func:`pydoc_texts`, ~465 KB of English);
* each document is tokenized with the model's tokenizer (no special tokens) and followed by
  ``eos_id``; the documents are concatenated and cut into blocks of ``block_len`` tokens, each
  starting with ``bos_id`` (as TransformerLens's ``tokenize_and_concatenate`` does), so no token
  is padding and none is lost except the incomplete tail;
* :class:`BlockStream` does this lazily, in bounded memory, and yields ``[batch, block_len]``
  batches, optionally shuffled through a seeded buffer and sharded across processes.

Packing is vectorized: documents are concatenated with ``torch.cat`` and blocks are views of the
result, never built token by token.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from torch.utils.data import IterableDataset

__all__ = [
    "encode_texts",
    "iter_blocks",
    "pack_blocks",
    "pack_labelled_blocks",
    "BlockStream",
    "shard_batch",
    "shuffle_groups",
    "global_batches",
    "hf_texts",
    "file_texts",
    "pydoc_texts",
]

Tokenizer = Any
"""An HF tokenizer (``PreTrainedTokenizerBase``), a ``tokenizers.Tokenizer``, or a callable
``list[str] -> list[list[int]]``."""


# ---------------------------------------------------------------------- tokenization
def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (packing adds BOS/EOS itself).

    Accepts a Hugging Face tokenizer (``model.tokenizer`` of a HookedTransformer), a raw
    ``tokenizers.Tokenizer``, or any callable mapping a list of strings to lists of ids.
    """
    texts = list(texts)
    if not texts:
        return []
    if not all(isinstance(t, str) for t in texts):
        bad = next(t for t in texts if not isinstance(t, str))
        raise TypeError(f"texts must be strings, got {type(bad).__name__}")
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab_size"):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    if hasattr(tokenizer, "batch_decode"):  # transformers tokenizer
        out = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in out]
    if callable(tokenizer):
        return [list(ids) for ids in tokenizer(texts)]
    raise TypeError(
        f"cannot tokenize with a {type(tokenizer).__name__}; pass a Hugging Face tokenizer "
        "(model.tokenizer), a tokenizers.Tokenizer, or a function list[str] -> list[list[int]]"
    )


def _special_id(tokenizer: Tokenizer, which: str) -> int | None:
    v = getattr(tokenizer, f"{which}_token_id", None)
    return int(v) if v is not None else None


# ---------------------------------------------------------------------- packing
def _as_fields(doc: Any) -> Tensor:
    t = torch.as_tensor(doc, dtype=torch.long)
    return t.reshape(1, -1) if t.dim() <= 1 else t


def iter_blocks(
    docs: Iterable[Sequence[int] | Tensor],
    block_len: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
    fill: Sequence[int] | None = None,
    drop_last: bool = True,
    pad_id: int = 0,
) -> Iterator[Int[Tensor, "fields n block_len"]]:
    """Pack documents into blocks, yielding the complete blocks as soon as they exist.

    Each document is a sequence of ids (one field) or a ``[fields, len]`` tensor whose rows are
    aligned per-token fields (e.g. ids and labels). The stream is the concatenation of
    ``doc + [eos_id]``; it is cut into pieces of ``block_len - 1`` (with ``bos_id``) or
    ``block_len`` tokens, and ``bos_id`` starts every block. ``fill[f]`` is the value field
    ``f >= 1`` takes at BOS/EOS positions (default -1). The tail that does not fill a block is
    dropped, or padded with ``pad_id`` (labels: ``fill``) when ``drop_last`` is False.

    Yields ``[fields, n, block_len]`` groups of consecutive blocks (``n`` may vary, never 0).
    """
    if block_len < 1 + (bos_id is not None):
        raise ValueError(f"block_len={block_len} is too short; need at least 2 with a BOS token")
    body = block_len - (bos_id is not None)
    buf: list[Tensor] = []
    n_buf = 0
    n_fields: int | None = None
    specials: Tensor | None = None

    for doc in docs:
        d = _as_fields(doc)
        if n_fields is None:
            n_fields = d.shape[0]
            extra = list(fill) if fill is not None else [-1] * (n_fields - 1)
            if len(extra) != n_fields - 1:
                raise ValueError(f"fill needs {n_fields - 1} value(s) for {n_fields} fields")
            specials = torch.tensor([0, *extra], dtype=torch.long)
        elif d.shape[0] != n_fields:
            raise ValueError(f"every document needs {n_fields} field row(s), got {d.shape[0]}")
        if eos_id is not None:
            eos = specials.clone()  # type: ignore[union-attr]
            eos[0] = eos_id
            d = torch.cat([d, eos.view(-1, 1)], dim=1)
        if d.shape[1] == 0:
            continue
        buf.append(d)
        n_buf += d.shape[1]
        if n_buf >= body:
            stream = torch.cat(buf, dim=1)
            n = stream.shape[1] // body
            yield _frame_blocks(stream[:, : n * body], n, body, bos_id, specials)
            rest = stream[:, n * body :]
            buf, n_buf = ([rest] if rest.shape[1] else []), rest.shape[1]
    if buf and not drop_last and specials is not None:
        stream = torch.cat(buf, dim=1)
        pad = specials.view(-1, 1).expand(-1, body - stream.shape[1]).clone()
        pad[0] = pad_id
        yield _frame_blocks(torch.cat([stream, pad], dim=1), 1, body, bos_id, specials)


def _frame_blocks(
    stream: Tensor, n: int, body: int, bos_id: int | None, specials: Tensor | None
) -> Tensor:
    """``[fields, n*body]`` -> ``[fields, n, block_len]`` with a BOS column in front."""
    blocks = stream.reshape(stream.shape[0], n, body)
    if bos_id is None:
        return blocks
    col = specials.clone()  # type: ignore[union-attr]
    col[0] = bos_id
    return torch.cat([col.view(-1, 1, 1).expand(-1, n, 1), blocks], dim=2)


def pack_blocks(
    docs: Iterable[Sequence[int] | Tensor],
    block_len: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
    drop_last: bool = True,
    pad_id: int = 0,
) -> Int[Tensor, "n block_len"]:
    """All blocks of :func:`iter_blocks` for single-field documents, as one ``[n, block_len]``."""
    parts = [b[0] for b in iter_blocks(docs, block_len, bos_id, eos_id, None, drop_last, pad_id)]
    if not parts:
        return torch.empty(0, block_len, dtype=torch.long)
    return torch.cat(parts)


def pack_labelled_blocks(
    docs: Iterable[Sequence[int] | Tensor],
    labels: Iterable[Sequence[int] | Tensor],
    block_len: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
    ignore_label: int = -1,
) -> tuple[Int[Tensor, "n block_len"], Int[Tensor, "n block_len"]]:
    """Pack documents with one label per token; BOS/EOS positions get ``ignore_label``.

    Returns ``(tokens, labels)``, both ``[n_blocks, block_len]`` and aligned.
    """

    def pairs() -> Iterator[Tensor]:
        for ids, lab in zip(docs, labels, strict=True):
            ids_t = torch.as_tensor(ids, dtype=torch.long)
            lab_t = torch.as_tensor(lab, dtype=torch.long)
            if ids_t.shape != lab_t.shape:
                raise ValueError(
                    f"a document has {ids_t.numel()} tokens but {lab_t.numel()} labels; give one "
                    "label per token"
                )
            yield torch.stack([ids_t, lab_t])

    parts = list(iter_blocks(pairs(), block_len, bos_id, eos_id, [ignore_label]))
    if not parts:
        empty = torch.empty(0, block_len, dtype=torch.long)
        return empty, empty.clone()
    both = torch.cat(parts, dim=1)
    return both[0], both[1]


# ---------------------------------------------------------------------- sharding
def shard_batch(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """Rows ``[rank*b/W, (rank+1)*b/W)`` of a global batch of ``b`` rows (``W = world_size``).

    Concatenating every rank's shard in rank order gives the global batch back, so a run on W
    processes sees exactly the data of a run on one process with the same global batch.
    """
    if world_size == 1:
        return batch
    b = batch.shape[0]
    if b % world_size:
        raise ValueError(
            f"a global batch of {b} rows cannot be split evenly over {world_size} processes; "
            f"use a batch size divisible by {world_size}"
        )
    per = b // world_size
    return batch[rank * per : (rank + 1) * per]


def _carry(
    groups: Iterable[Tensor],
    at_least: int,
    cut: Callable[[Tensor], tuple[Iterable[Tensor], Tensor]],
) -> Generator[Tensor, None, Tensor | None]:
    """Concatenate ``groups`` until they hold ``at_least`` rows, then yield what ``cut`` takes
    from them and carry what it leaves into the next round. Returns what is left at the end
    (None if no group came)."""
    kept: list[Tensor] = []
    n = 0
    for g in groups:
        kept.append(g)
        n += g.shape[0]
        if n >= at_least:
            out, rest = cut(torch.cat(kept))
            yield from out
            kept, n = [rest], rest.shape[0]
    return torch.cat(kept) if kept else None


def shuffle_groups(
    groups: Iterable[Tensor], buffer: int, seed: int, epoch: int = 0
) -> Iterator[Tensor]:
    """Groups of blocks mixed through a seeded buffer of about ``buffer`` blocks (a new order
    for each ``epoch``); ``buffer <= 1`` passes them through in order.

    Whenever the buffer holds ``buffer`` blocks it emits a random half and keeps the other half
    to mix with what comes next; at the end it emits the rest, shuffled.
    """
    if buffer <= 1:
        yield from groups
        return
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)

    def emit_half(mixed: Tensor) -> tuple[list[Tensor], Tensor]:
        perm = torch.randperm(mixed.shape[0], generator=gen)
        half = mixed.shape[0] // 2  # emit half, keep half to mix with what comes next
        return [mixed[perm[:half]]], mixed[perm[half:]]

    rest = yield from _carry(groups, buffer, emit_half)
    if rest is not None:
        yield rest[torch.randperm(rest.shape[0], generator=gen)]


def global_batches(
    groups: Iterable[Tensor],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> Iterator[Tensor]:
    """Rank ``rank``'s rows (:func:`shard_batch`) of each global batch of ``batch_size`` blocks
    cut from ``groups`` in order. The blocks left over at the end make one last, smaller batch
    when ``drop_last`` is False and ``world_size`` divides their number; else they are dropped.
    """

    def whole_batches(pool: Tensor) -> tuple[Iterator[Tensor], Tensor]:
        k = pool.shape[0] // batch_size
        shards = (
            shard_batch(b, rank, world_size) for b in pool[: k * batch_size].split(batch_size)
        )
        return shards, pool[k * batch_size :]

    rest = yield from _carry(groups, batch_size, whole_batches)
    if rest is not None and rest.shape[0] and not drop_last and rest.shape[0] % world_size == 0:
        yield shard_batch(rest, rank, world_size)


# ---------------------------------------------------------------------- streaming
class BlockStream(IterableDataset):
    """Stream ``[batch, block_len]`` token batches from texts, in bounded memory.

    >>> stream = BlockStream(hf_texts(ds), model.tokenizer, block_len=128, batch_size=32)
    >>> for tokens in stream: ...   # LongTensor [32, 128]; every row starts with BOS

    Texts are tokenized ``tokenize_batch`` at a time, packed as in :func:`iter_blocks`, optionally
    shuffled through a buffer of ``shuffle_buffer`` blocks (seeded; a new order each epoch), and
    grouped into batches of ``batch_size`` blocks (the *global* batch). With ``world_size > 1``
    each process yields only its rows of every global batch (:func:`shard_batch`), so the
    processes together see the same data as one process would. ``repeat=True`` cycles over the
    texts forever (``texts`` must then be re-iterable: a list, a dataset, or a zero-argument
    callable returning a fresh iterable).
    """

    def __init__(
        self,
        texts: Iterable[str] | Callable[[], Iterable[str]],
        tokenizer: Tokenizer,
        block_len: int,
        batch_size: int,
        bos_id: int | None | str = "auto",
        eos_id: int | None | str = "auto",
        shuffle_buffer: int = 0,
        seed: int = 0,
        repeat: bool = False,
        rank: int = 0,
        world_size: int = 1,
        tokenize_batch: int = 256,
        drop_last: bool = True,
    ):
        if batch_size < 1 or block_len < 2:
            raise ValueError(
                f"need batch_size >= 1 and block_len >= 2, got {batch_size}, {block_len}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size={batch_size} is the global batch; it must be divisible by "
                f"world_size={world_size}"
            )
        self.texts = texts
        self.tokenizer = tokenizer
        self.block_len = block_len
        self.batch_size = batch_size
        self.bos_id = _special_id(tokenizer, "bos") if bos_id == "auto" else bos_id
        self.eos_id = _special_id(tokenizer, "eos") if eos_id == "auto" else eos_id
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.repeat = repeat
        self.rank = rank
        self.world_size = world_size
        self.tokenize_batch = tokenize_batch
        self.drop_last = drop_last

    def _texts(self) -> Iterable[str]:
        return self.texts() if callable(self.texts) else self.texts

    def _docs(self) -> Iterator[list[int]]:
        chunk: list[str] = []
        for t in self._texts():
            chunk.append(t)
            if len(chunk) == self.tokenize_batch:
                yield from encode_texts(self.tokenizer, chunk)
                chunk = []
        if chunk:
            yield from encode_texts(self.tokenizer, chunk)

    def blocks(self, epoch: int = 0) -> Iterator[Int[Tensor, "n block_len"]]:
        """Groups of consecutive (or shuffled) blocks of one pass over the texts."""
        groups = (
            g[0]
            for g in iter_blocks(
                self._docs(), self.block_len, self.bos_id, self.eos_id, drop_last=self.drop_last
            )
        )
        return shuffle_groups(groups, self.shuffle_buffer, self.seed, epoch)

    def __iter__(self) -> Iterator[Int[Tensor, "batch block_len"]]:
        epoch = 0
        while True:
            groups = self.blocks(epoch)
            first = next(groups, None)
            if first is not None:
                yield from global_batches(
                    itertools.chain((first,), groups), self.batch_size, self.rank,
                    self.world_size, drop_last=self.drop_last,
                )  # fmt: skip
            elif epoch == 0:
                raise ValueError(
                    f"the texts gave no complete block of {self.block_len} tokens; give more text "
                    "or a shorter block_len"
                )
            epoch += 1
            if not self.repeat:
                return


# ---------------------------------------------------------------------- sources
def hf_texts(dataset: Any, column: str = "text", batch_size: int = 1000) -> Iterator[str]:
    """The ``column`` strings of a Hugging Face ``datasets`` dataset, map-style or streaming.

    Empty strings (WikiText's blank lines) are skipped. Pass the dataset itself, e.g.
    ``datasets.load_dataset("roneneldan/TinyStories", split="train", streaming=True)``.
    """
    names = getattr(dataset, "column_names", None)
    if names is not None and column not in names:
        raise KeyError(f"dataset has no column {column!r}; its columns are {list(names)}")
    if hasattr(dataset, "iter"):
        for batch in dataset.iter(batch_size=batch_size):
            yield from (t for t in batch[column] if t)
        return
    for row in dataset:
        t = row[column]
        if t:
            yield t


def file_texts(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    unit: str = "file",
    pattern: str = "*.txt",
    encoding: str = "utf-8",
) -> Iterator[str]:
    """Documents from local text files (directories are searched for ``pattern``, sorted).

    ``unit`` says what one document is: ``"file"``, ``"paragraph"`` (split on blank lines) or
    ``"line"``; empty documents are skipped.
    """
    if unit not in ("file", "paragraph", "line"):
        raise ValueError(f"unit={unit!r}; choose 'file', 'paragraph' or 'line'")
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for p in map(Path, items):
        if p.is_dir():
            files.extend(sorted(p.rglob(pattern)))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    for f in files:
        text = f.read_text(encoding=encoding)
        if unit == "file":
            parts: Iterable[str] = [text]
        elif unit == "line":
            parts = text.splitlines()
        else:
            parts = (p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n"))
        yield from (p for p in parts if p.strip())


def pydoc_texts() -> list[str]:
    """The Python reference topics shipped with CPython (``pydoc_data.topics``): ~80 documents,
    ~465 KB of real English about Python, sorted by topic name. Available offline everywhere."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]
