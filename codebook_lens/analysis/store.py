"""`CodeStore`: the code ids of chosen sites over a token dataset, in memory or on disk.

A store holds, per site, code ids ``[n_seq, pos, head, k]`` in the smallest signed dtype that
holds ``[-1, n_codes)`` (``head`` = 1 at sites without a head/group axis), and optionally the
tokens ``[n_seq, pos]``. It is a sequence of shards (runs of whole sequences): one in memory for
a store built by :meth:`CodeStore.from_codes`, :meth:`CodeStore.load` or
``collect_codes(...)``; memory-mapped shard files for one opened with :meth:`CodeStore.open`
(or collected with ``collect_codes(..., out=PATH)``), whose pages are read only when used.

Every query (:meth:`code_counts`, :meth:`fires`, :meth:`positions`) and the analysis functions
(attribution, examples, the browser's search and code pages) run chunk by chunk over
:meth:`CodeStore.chunks`, so they work on stores larger than memory and give exactly the same
results on either kind. :attr:`CodeStore.codes`, :attr:`CodeStore.tokens`, :meth:`get` and
:meth:`require_tokens` concatenate a disk store's shards, i.e. load that site (or the tokens)
into memory. The on-disk format is described in :mod:`codebook_lens.analysis.store_manifest`.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from codebook_lens.analysis.store_files import ShardFile, write_counts_file, write_store_shard
from codebook_lens.analysis.store_manifest import (
    STORE_FORMAT,
    STORE_KIND,
    STORE_VERSION,
    check_codes_range,
    check_counts_file,
    check_manifest,
    check_shards,
    check_tokens_range,
    new_manifest,
    verify_hashes,
    with_shards,
)
from codebook_lens.atomic import open_dir, save_dir
from codebook_lens.errors import CheckpointError
from codebook_lens.suggest import unknown_site_error

__all__ = [
    "CodeStore",
    "smallest_int_dtype",
    "dedupe_slots",
    "count_codes",
    "STORE_FORMAT",
    "STORE_KIND",
]

_CHUNK_SLOTS = 1 << 22  # code slots per chunk: 32 MiB once widened to int64


def smallest_int_dtype(max_value: int, min_value: int = -1) -> torch.dtype:
    """The smallest signed integer dtype holding every value in ``[min_value, max_value]``."""
    for dt in (torch.int8, torch.int16, torch.int32, torch.int64):
        info = torch.iinfo(dt)
        if info.min <= min_value and max_value <= info.max:
            return dt
    raise ValueError(f"no integer dtype holds [{min_value}, {max_value}]")


def _repeats(codes: Tensor) -> Tensor:
    """Bool ``[..., k]``: True where a slot repeats an id of an earlier slot. Pairwise
    comparisons of the ``k`` slot columns (a loop over slots, vectorized over the rest) for
    small ``k``, a sort for large ``k``."""
    k = codes.shape[-1]
    if k > 16:
        s, i = codes.sort(dim=-1, stable=True)
        dup_sorted = torch.zeros_like(s, dtype=torch.bool)
        dup_sorted[..., 1:] = s[..., 1:] == s[..., :-1]
        return torch.zeros_like(dup_sorted).scatter_(-1, i, dup_sorted)
    dup = torch.zeros_like(codes, dtype=torch.bool)
    for j in range(1, k):
        d = dup[..., j]
        for i in range(j):
            d |= codes[..., i] == codes[..., j]
    return dup


def dedupe_slots(codes: Int[Tensor, "... k"]) -> Int[Tensor, "... k"]:
    """Codes with repeated ids within a position replaced by -1 (the lowest slot keeps its id),
    so that each code counts once per position. Slot order is kept."""
    if codes.shape[-1] < 2:
        return codes
    return codes.masked_fill(_repeats(codes), -1)


def count_codes(codes: Int[Tensor, "n pos head k"], n_codes: int) -> Int[Tensor, "head n_codes"]:
    """How many positions each code fires at, per head (once per position), in ``codes``.
    Works on the compact dtype (int32 ids; empty and repeated slots go to a discarded bin)."""
    h, k = codes.shape[2], codes.shape[3]
    size = h * n_codes
    counts = torch.zeros(size + 1, dtype=torch.long)
    offs = (torch.arange(h, dtype=torch.int64) * n_codes).view(1, h, 1)
    wide = torch.int32 if size < 2**31 else torch.int64
    for x in codes.reshape(-1, h, k).split(max(1, _CHUNK_SLOTS // max(h * k, 1))):
        skip = x < 0
        if k > 1:
            skip |= _repeats(x)
        ids = torch.where(skip, size, x.to(wide) + offs.to(wide))
        counts += torch.bincount(ids.reshape(-1), minlength=size + 1)
    return counts[:size].view(h, n_codes)


@dataclass
class _Part:
    """One shard: ``n_seq`` whole sequences from ``start``, as tensors or a mapped file."""

    start: int
    n_seq: int
    codes: dict[str, Tensor] | None = None
    tokens: Tensor | None = None
    file: ShardFile | None = None

    def site(self, site: str) -> Tensor:
        return self.codes[site] if self.file is None else self.file.tensor(f"codes.{site}")

    def toks(self) -> Tensor | None:
        if self.file is None:
            return self.tokens
        return self.file.tensor("tokens") if "tokens" in self.file.entries else None

    def counts(self, site: str) -> Tensor | None:
        return None if self.file is None else self.file.tensor(f"counts.{site}")


class _JoinedCodes(Mapping):
    """``store.codes`` of a disk store: each site's shards concatenated when asked for."""

    def __init__(self, store: CodeStore):
        self.store = store

    def __getitem__(self, site: str) -> Tensor:
        self.store.check_site(site)
        return self.store.code_range(site, 0, self.store.n_seq)

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.sites)

    def __len__(self) -> int:
        return len(self.store.sites)


def _check_layout(codes: Mapping[str, Tensor], n_codes: Mapping, per_head: Mapping, tokens) -> None:
    if not codes:
        raise ValueError("a CodeStore needs codes of at least one site")
    shapes = {s: tuple(c.shape[:2]) for s, c in codes.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"all sites must cover the same [n_seq, pos]; got {shapes}")
    for s, c in codes.items():
        if c.dim() != 4:
            raise ValueError(f"codes of {s} must be [n_seq, pos, head, k], got {tuple(c.shape)}")
        if s not in n_codes or s not in per_head:
            raise ValueError(f"n_codes and per_head must name every site; missing {s!r}")
    if tokens is not None and tuple(tokens.shape) != next(iter(shapes.values())):
        raise ValueError(
            f"tokens {tuple(tokens.shape)} must match the codes' [n_seq, pos] "
            f"{next(iter(shapes.values()))}"
        )


class CodeStore:
    """Code ids of some sites over ``n_seq`` sequences of ``seq_len`` tokens.

    Codes of every site are kept as ``[n_seq, pos, head, k]`` (``head`` = 1 at sites without a
    head/group axis); :meth:`get` returns them in the model's own layout. Build one with
    ``collect_codes`` (from a model, in memory or written to disk), :meth:`from_codes` (from
    tensors), :meth:`load` (a saved store, into memory) or :meth:`open` (memory-mapped).
    """

    n_codes: dict[str, int]
    """Site -> number of codes per group of its codebook (ids lie in ``[-1, n_codes)``)."""
    per_head: dict[str, bool]
    """Site -> whether the model's codes carry a head/group axis (``[b, p, head, k]``)."""
    d_vocab: int | None
    """Vocabulary size of the model (bounds token ids), if known."""
    meta: dict[str, Any]
    """Free-form JSON-ready metadata saved with the store."""
    path: Path | None
    """The directory of a store opened from disk (None in memory)."""
    manifest: dict[str, Any] | None
    """The manifest (``store.json``) of a store opened from disk (None in memory)."""

    def __init__(
        self,
        codes: Mapping[str, Tensor],
        n_codes: Mapping[str, int],
        per_head: Mapping[str, bool],
        tokens: Tensor | None = None,
        d_vocab: int | None = None,
        meta: dict[str, Any] | None = None,
    ):
        """An in-memory store of ``codes`` (site -> compact ids ``[n_seq, pos, head, k]``, -1 =
        empty) and ``tokens`` ``[n_seq, pos]``; shapes are checked with messages that name them
        (the tensors are not annotated with shapes for that reason)."""
        _check_layout(codes, n_codes, per_head, tokens)
        first = next(iter(codes.values()))
        self._setup(
            {s: tuple(c.shape[1:]) for s, c in codes.items()},
            {s: c.dtype for s, c in codes.items()},
            None if tokens is None else tokens.dtype,
            [_Part(0, first.shape[0], dict(codes), tokens)],
        )
        self.n_codes, self.per_head = dict(n_codes), dict(per_head)
        self.d_vocab, self.meta = d_vocab, dict(meta or {})
        self.path, self.manifest, self._counts_file = None, None, None

    def _setup(self, shapes: dict, dtypes: dict, token_dtype: Any, parts: list[_Part]) -> None:
        self._shape: dict[str, tuple[int, int, int]] = shapes
        self._dtype: dict[str, torch.dtype] = dtypes
        self._token_dtype: torch.dtype | None = token_dtype
        self._parts = parts
        self._n_seq = sum(p.n_seq for p in parts)
        self._seq_len = next(iter(shapes.values()))[0]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(
        cls,
        codes: Mapping[str, Int[Tensor, "seq pos *head k"]],
        n_codes: Mapping[str, int] | int,
        tokens: Int[Tensor, "seq pos"] | None = None,
        d_vocab: int | None = None,
    ) -> CodeStore:
        """Build a store from code tensors in the model's layout (``[b, p, k]`` or
        ``[b, p, head, k]``), e.g. ``cache[codes_hook_name(site)]``. ``n_codes`` may be one int
        for all sites."""
        nc = {s: (n_codes if isinstance(n_codes, int) else n_codes[s]) for s in codes}
        store_codes, per_head = {}, {}
        for s, c in codes.items():
            if c.dim() not in (3, 4):
                raise ValueError(
                    f"codes of {s} must be [batch, pos, k] or [batch, pos, head, k], got "
                    f"{tuple(c.shape)}"
                )
            if c.numel() and (int(c.min()) < -1 or int(c.max()) >= nc[s]):
                raise ValueError(
                    f"codes of {s} must lie in [-1, {nc[s]}); got [{int(c.min())}, "
                    f"{int(c.max())}]; pass the right n_codes"
                )
            per_head[s] = c.dim() == 4
            c4 = c if per_head[s] else c[:, :, None]
            store_codes[s] = c4.to("cpu", smallest_int_dtype(nc[s] - 1))
        if tokens is not None:
            hi = int(tokens.max()) if tokens.numel() else 0
            d_vocab = d_vocab if d_vocab is not None else hi + 1
            tokens = tokens.to("cpu", smallest_int_dtype(max(d_vocab - 1, 0)))
        return cls(store_codes, nc, per_head, tokens, d_vocab)

    # ------------------------------------------------------------------ shape facts
    @property
    def sites(self) -> list[str]:
        """Stored sites, in order."""
        return list(self._shape)

    @property
    def n_seq(self) -> int:
        """Number of sequences."""
        return self._n_seq

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return self._seq_len

    @property
    def n_tokens(self) -> int:
        """``n_seq * seq_len``."""
        return self.n_seq * self.seq_len

    @property
    def has_tokens(self) -> bool:
        """Whether the store kept the tokens."""
        return self._token_dtype is not None

    @property
    def n_shards(self) -> int:
        """Number of shards (1 for a store built in memory)."""
        return len(self._parts)

    @property
    def nbytes(self) -> int:
        """Bytes of code ids and tokens (in memory, or on disk without headers and counts)."""
        n = sum(math.prod(sh) * self._dtype[s].itemsize for s, sh in self._shape.items())
        if self._token_dtype is not None:
            n += self.seq_len * self._token_dtype.itemsize
        return n * self.n_seq

    @property
    def codes(self) -> Mapping[str, Int[Tensor, "seq pos head k"]]:
        """Site -> compact code ids ``[n_seq, pos, head, k]``; -1 marks an empty slot. For a
        disk store each access concatenates the site's shards (loads it into memory): use
        :meth:`chunks` to stream instead."""
        if self.path is None and len(self._parts) == 1:
            return self._parts[0].codes
        return _JoinedCodes(self)

    @property
    def tokens(self) -> Int[Tensor, "seq pos"] | None:
        """The input tokens ``[n_seq, pos]`` (compact dtype), or None if not kept. For a disk
        store this concatenates the shards (loads them): use :meth:`token_chunks` to stream."""
        if not self.has_tokens:
            return None
        if self.path is None and len(self._parts) == 1:
            return self._parts[0].tokens
        return torch.cat([p.toks() for p in self._parts])

    def check_site(self, site: str) -> None:
        """Raise a KeyError naming the stored sites if ``site`` is not one of them."""
        if site not in self._shape:
            raise unknown_site_error(site, self._shape, "stored codes")

    def n_heads(self, site: str) -> int:
        """Size of the head/group axis of ``site`` (1 for sites without one)."""
        self.check_site(site)
        return self._shape[site][1]

    def k(self, site: str) -> int:
        """Code slots per position (and head) at ``site``."""
        self.check_site(site)
        return self._shape[site][2]

    def check_code(self, site: str, code: int) -> None:
        """An IndexError naming the valid range when ``code`` is not a code id of ``site``."""
        self.check_site(site)
        n = self.n_codes[site]
        if not 0 <= int(code) < n:
            raise IndexError(f"code {code} out of range; {site} has codes 0..{n - 1}")

    def _head(self, site: str, head: int | None) -> int | None:
        h = self.n_heads(site)
        if head is not None and not -h <= head < h:
            raise IndexError(f"head {head} out of range; {site} has {h} head(s)")
        return None if head is None else head % h

    # ------------------------------------------------------------------ streaming access
    def chunk_seqs(self, site: str | None = None) -> int:
        """The default sequences per chunk: about 4M code slots of ``site`` (tokens: 1M)."""
        per = self.seq_len * (math.prod(self._shape[site][1:]) if site else 4)
        return max(1, _CHUNK_SLOTS // max(per, 1))

    def _spans(self, max_seqs: int | None, site: str | None) -> Iterator[tuple[_Part, int, int]]:
        step = max_seqs or self.chunk_seqs(site)
        if step < 1:
            raise ValueError(f"max_seqs={max_seqs}; pass a positive number of sequences")
        for p in self._parts:
            for a in range(0, p.n_seq, step):
                yield p, a, min(p.n_seq, a + step)

    def chunks(
        self, site: str, max_seqs: int | None = None
    ) -> Iterator[tuple[int, Int[Tensor, "n pos head k"]]]:
        """``(first sequence, codes [n, pos, head, k])`` pieces of ``site`` in order, each
        within one shard and at most ``max_seqs`` sequences (default :meth:`chunk_seqs`).
        Pieces of a disk store are memory-mapped views (compact dtype; do not modify them).
        :meth:`token_chunks` with the same ``max_seqs`` yields the same ranges."""
        self.check_site(site)
        for p, a, b in self._spans(max_seqs or self.chunk_seqs(site), site):
            yield p.start + a, p.site(site)[a:b]

    def token_chunks(
        self, max_seqs: int | None = None
    ) -> Iterator[tuple[int, Int[Tensor, "n pos"]]]:
        """``(first sequence, tokens [n, pos])`` pieces in order (compact dtype), the ranges of
        :meth:`chunks` for the same ``max_seqs``; a ValueError if the store has no tokens."""
        self.check_tokens()
        for p, a, b in self._spans(max_seqs or self.chunk_seqs(None), None):
            yield p.start + a, p.toks()[a:b]

    def check_tokens(self) -> None:
        """A ValueError saying how to keep tokens if the store has none."""
        if not self.has_tokens:
            raise ValueError(
                "this CodeStore has no tokens; collect it with keep_tokens=True or pass "
                "tokens= to CodeStore.from_codes"
            )

    def _rows(self, seqs: Tensor, read: Any, shape: tuple[int, ...], dtype: Any) -> Tensor:
        seqs = torch.as_tensor(seqs, dtype=torch.long).reshape(-1).contiguous()
        if seqs.numel() and not (0 <= int(seqs.min()) and int(seqs.max()) < self.n_seq):
            raise IndexError(f"sequence index out of range; the store has {self.n_seq} sequences")
        starts = torch.tensor([p.start for p in self._parts])
        which = torch.searchsorted(starts, seqs, right=True) - 1
        out = torch.empty((seqs.numel(), *shape), dtype=dtype)
        for w in which.unique().tolist():  # loop over the shards touched
            sel = which == w
            out[sel] = read(self._parts[w])[seqs[sel] - self._parts[w].start]
        return out

    def code_rows(self, site: str, seqs: Int[Tensor, " n"]) -> Int[Tensor, "n pos head k"]:
        """Codes ``[len(seqs), pos, head, k]`` (compact) of the given sequences, in order."""
        self.check_site(site)
        return self._rows(seqs, lambda p: p.site(site), self._shape[site], self._dtype[site])

    def token_rows(self, seqs: Int[Tensor, " n"]) -> Int[Tensor, "n pos"]:
        """Tokens ``[len(seqs), pos]`` (compact) of the given sequences, in order."""
        self.check_tokens()
        return self._rows(seqs, lambda p: p.toks(), (self.seq_len,), self._token_dtype)

    def code_range(self, site: str, start: int, stop: int) -> Int[Tensor, "n pos head k"]:
        """Codes of sequences ``start:stop`` (compact, a copy when it spans shards)."""
        pieces = [c[max(0, start - a) : stop - a] for a, c in self._overlaps(site, start, stop)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def token_range(self, start: int, stop: int) -> Int[Tensor, "n pos"]:
        """Tokens of sequences ``start:stop`` (compact, a copy when it spans shards)."""
        self.check_tokens()
        pieces = [t[max(0, start - a) : stop - a] for a, t in self._overlaps(None, start, stop)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _overlaps(self, site: str | None, start: int, stop: int) -> list[tuple[int, Tensor]]:
        out = [
            (p.start, p.site(site) if site is not None else p.toks())
            for p in self._parts
            if p.start < stop and start < p.start + p.n_seq
        ]
        if not out:
            shape = self._shape[site] if site else (self.seq_len,)
            dtype = self._dtype[site] if site else self._token_dtype
            out = [(start, torch.empty((0, *shape), dtype=dtype))]
        return out

    # ------------------------------------------------------------------ whole-site access
    def get(self, site: str, dtype: torch.dtype = torch.long) -> Int[Tensor, "seq pos *head k"]:
        """Codes of ``site`` in the model's layout (``[b, p, k]`` or ``[b, p, head, k]``), in
        memory (for a disk store this loads the whole site)."""
        self.check_site(site)
        c = self.code_range(site, 0, self.n_seq).to(dtype)
        return c if self.per_head[site] else c[:, :, 0]

    def require_tokens(self) -> Int[Tensor, "seq pos"]:
        """The stored tokens as int64 (in memory), or a clear error if the store kept none."""
        self.check_tokens()
        return self.token_range(0, self.n_seq).long()

    # ------------------------------------------------------------------ queries
    @property
    def has_counts(self) -> bool:
        """Whether :meth:`code_counts` is read from counts stored with the shards (a disk
        store) rather than computed from the codes."""
        return self.path is not None

    def code_counts(self, site: str) -> Int[Tensor, "head n_codes"]:
        """How many positions each code fires at, per head (a code counts once per position).
        A disk store reads the counts its collection stored; others count chunk by chunk."""
        self.check_site(site)
        if self._counts_file is not None:
            return self._counts_file.tensor(f"counts.{site}").clone()
        if self.has_counts:
            return sum((p.counts(site) for p in self._parts), self._zero_counts(site))
        total = self._zero_counts(site)
        for _, c in self.chunks(site):
            total += count_codes(c, self.n_codes[site])
        return total

    def _zero_counts(self, site: str) -> Tensor:
        return torch.zeros(self._shape[site][1], self.n_codes[site], dtype=torch.long)

    def fires(self, site: str, code: int, head: int | None = None) -> Bool[Tensor, "seq pos"]:
        """Where ``code`` fires at ``site`` (in any slot; at ``head``, or at any head if None)."""
        self.check_code(site, code)
        head = self._head(site, head)
        out = torch.empty(self.n_seq, self.seq_len, dtype=torch.bool)
        for start, c in self.chunks(site):
            if head is not None:
                c = c[:, :, head : head + 1]
            out[start : start + c.shape[0]] = (c == code).any(-1).any(-1)
        return out

    def positions(self, site: str, code: int, head: int | None = None) -> Int[Tensor, "n 2"]:
        """``(seq, pos)`` rows of every position where ``code`` fires (see :meth:`fires`)."""
        return self.fires(site, code, head).nonzero()

    # ------------------------------------------------------------------ io
    def save(
        self,
        path: str | os.PathLike[str],
        shard_mb: float = 256.0,
        overwrite: bool = False,
        shard_seqs: int | None = None,
    ) -> None:
        """Write the store to directory ``path`` in one atomic step (format version 2:
        ``store.json`` and ``shard-NNNNN.safetensors`` files of whole sequences, at most about
        ``shard_mb`` MiB each, with hashes and code counts; see
        :mod:`~codebook_lens.analysis.store_manifest`). Works for disk stores too (a copy).

        ``shard_seqs`` sets the sequences per shard instead. A directory holding anything other
        than a CodeStore is refused unless ``overwrite=True`` (which still replaces only
        codebook_lens's own files)."""
        if not 0 < shard_mb <= 2**20:
            raise ValueError(f"shard_mb={shard_mb}; pass a size in (0, 2**20] MiB")
        if shard_seqs is not None and shard_seqs < 1:
            raise ValueError(f"shard_seqs={shard_seqs}; pass a positive number of sequences")
        per_seq = max(1, self.nbytes // max(self.n_seq, 1))
        seqs_per_shard = shard_seqs or max(1, int(shard_mb * 2**20) // per_seq)
        m = new_manifest(self._settings(seqs_per_shard), uuid.uuid4().hex, self.meta, None)

        def write(tmp: Path) -> None:
            recs, totals = [], {s: self._zero_counts(s) for s in self.sites}
            for i, a in enumerate(range(0, self.n_seq, seqs_per_shard)):
                b = min(self.n_seq, a + seqs_per_shard)
                codes = {s: self.code_range(s, a, b) for s in self.sites}
                counts = {s: count_codes(c, self.n_codes[s]) for s, c in codes.items()}
                for s in self.sites:
                    totals[s] += counts[s]
                toks = self.token_range(a, b) if self.has_tokens else None
                recs.append(write_store_shard(tmp, m["store_id"], i, codes, toks, counts))
            counts_rec = write_counts_file(tmp, m["store_id"], len(recs), totals)
            m.update(with_shards(m, recs, complete=True, counts=counts_rec))  # before the head

        save_dir(path, STORE_KIND, m, write, overwrite=overwrite)

    def _settings(self, shard_seqs: int) -> dict[str, Any]:
        """The store's layout as manifest fields (see ``store_manifest.new_manifest``)."""
        return {
            "sites": self.sites,
            "n_codes": dict(self.n_codes),
            "per_head": dict(self.per_head),
            "dtypes": {s: str(d).removeprefix("torch.") for s, d in self._dtype.items()},
            "shapes": {s: [0, *sh] for s, sh in self._shape.items()},
            "seq_len": self.seq_len,
            "has_tokens": self.has_tokens,
            "token_dtype": str(self._token_dtype).removeprefix("torch.")
            if self.has_tokens
            else None,
            "d_vocab": self.d_vocab,
            "shard_seqs": shard_seqs,
        }

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], allow_partial: bool = False, verify: bool = False
    ) -> CodeStore:
        """Open a saved or collected store memory-mapped (nothing is read until used).

        Every open checks the structure: every listed shard present with the recorded size,
        store id, index, keys, dtypes and shapes, and no unlisted shard (headers only).
        ``verify=True`` also hashes every file against the manifest (about 1 GB/s). An
        interrupted collection is refused unless ``allow_partial=True`` (then the complete
        shards are opened). Raises CheckpointError naming the file and the fix."""
        with open_dir(path, STORE_KIND) as (head, data):
            return cls._open_locked(Path(path), head, data, allow_partial, verify)

    @classmethod
    def _open_locked(
        cls, path: Path, head: dict[str, Any], data: Path, allow_partial: bool, verify: bool
    ) -> CodeStore:
        """:meth:`open`, inside :func:`~codebook_lens.atomic.open_dir` (files stay put)."""
        file = path / STORE_KIND.head
        _check_version(head, file)
        check_manifest(head, file)
        if not head["complete"] and not allow_partial:
            raise _incomplete(path, head)
        shards = check_shards(head, data)
        counts = check_counts_file(head, data)
        if verify:
            verify_hashes(head, data)
        return cls._from_files(path, head, shards, counts)

    @classmethod
    def _from_files(
        cls, path: Path, m: dict[str, Any], shards: list[ShardFile], counts: ShardFile | None
    ) -> CodeStore:
        self = cls.__new__(cls)
        starts = [0]
        for r in m["shards"]:
            starts.append(starts[-1] + r["n_seq"])
        parts = [_Part(a, r["n_seq"], file=f) for a, r, f in zip(starts, m["shards"], shards)]
        if not parts:  # an empty store: one empty in-memory part keeps the shapes
            parts = [_Part(0, 0, _empty_codes(m), _empty_tokens(m))]
        self._setup(
            {s: tuple(m["shapes"][s][1:]) for s in m["sites"]},
            {s: _dt(m["dtypes"][s]) for s in m["sites"]},
            _dt(m["token_dtype"]) if m["has_tokens"] else None,
            parts,
        )
        self.n_codes, self.per_head = dict(m["n_codes"]), dict(m["per_head"])
        self.d_vocab, self.meta = m.get("d_vocab"), dict(m.get("meta", {}))
        self.path, self.manifest, self._counts_file = path, m, counts
        return self

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CodeStore:
        """Load a saved or collected store into memory. Checks what :meth:`open` checks, every
        content hash and every value (code ids in ``[-1, n_codes)``, tokens in
        ``[0, d_vocab)``); raises CheckpointError naming the file and the fix."""
        with open_dir(path, STORE_KIND) as (head, data):  # read while no writer deletes
            disk = cls._open_locked(Path(path), head, data, False, True)
            file = Path(path) / STORE_KIND.head
            codes = {s: disk.code_range(s, 0, disk.n_seq).clone() for s in disk.sites}
            for s, c in codes.items():
                check_codes_range(s, c, disk.n_codes[s], file)
            tokens = disk.token_range(0, disk.n_seq).clone() if disk.has_tokens else None
            if tokens is not None:
                check_tokens_range(tokens, disk.d_vocab, file)
        return cls(codes, disk.n_codes, disk.per_head, tokens, disk.d_vocab, disk.meta)

    def verify(self) -> None:
        """Hash every file of a disk store against its manifest (CheckpointError on the first
        difference); nothing to do for a store in memory."""
        if self.path is not None:
            with open_dir(self.path, STORE_KIND) as (head, data):
                if head.get("store_id") != self.manifest["store_id"]:
                    raise CheckpointError(f"{self.path} was replaced since it was opened")
                verify_hashes(self.manifest, data)


def _dt(name: str) -> torch.dtype:
    return getattr(torch, name)


def _empty_codes(m: dict[str, Any]) -> dict[str, Tensor]:
    return {s: torch.empty((0, *m["shapes"][s][1:]), dtype=_dt(m["dtypes"][s])) for s in m["sites"]}


def _empty_tokens(m: dict[str, Any]) -> Tensor | None:
    if not m["has_tokens"]:
        return None
    return torch.empty((0, m["seq_len"]), dtype=_dt(m["token_dtype"]))


def _check_version(head: dict[str, Any], file: Path) -> None:
    v = head.get("version")
    if type(v) is not int or v != STORE_VERSION:
        raise CheckpointError(
            f"{file}: version {v!r} is not a CodeStore format version this codebook_lens reads "
            f"({STORE_VERSION}); upgrade codebook_lens or collect the store again"
        )


def _incomplete(path: Path, m: dict[str, Any]) -> CheckpointError:
    return CheckpointError(
        f"{path} is an incomplete code store: its collection was interrupted or is still "
        f"running ({len(m['shards'])} complete shard(s), {m['n_seq']} sequences so far). Resume "
        f"it by running the same collection again (collect_codes(cm, data, out={str(path)!r}) "
        "with the same settings and data, or the same `codebook-lens collect` command), or open "
        f"what is there with CodeStore.open({str(path)!r}, allow_partial=True)"
    )
