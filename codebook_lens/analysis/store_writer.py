"""Writing a code store to disk while it is collected: the directory and its lock, resuming,
the manifest after every shard, the counts at the end.

One process (rank 0 of a collection) owns a :class:`StoreWriter`; every process writes its own
shard files into :attr:`WritePlan.data` with ``store_files.write_store_shard``. The manifest
(``store.json``) is replaced atomically after each round of shards and lists only shards whose
files are complete, so a kill at any moment loses at most the shards in progress; a later
:meth:`StoreWriter.begin` with the same settings continues after the last complete full shard.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codebook_lens.analysis.store_files import ShardFile, shard_index, write_counts_file
from codebook_lens.analysis.store_manifest import (
    COUNTS_FILE,
    STORE_KIND,
    check_manifest,
    check_shards,
    new_manifest,
    settings_mismatch,
    with_shards,
)
from codebook_lens.atomic import (
    READ_LOCK,
    WRITE_LOCK,
    check_save_target,
    holds_data,
    open_dir,
    write_file,
)
from codebook_lens.errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["StoreWriter", "WritePlan"]


@dataclass(frozen=True)
class WritePlan:
    """What every process of a collection needs to know about the store being written."""

    data: str
    """The directory the shard files go to."""
    store_id: str
    """The store's id (in every shard's metadata)."""
    shard_seqs: int
    """Sequences per shard (the last one may hold fewer)."""
    n_done: int
    """Shards already complete: a resumed collection skips them (checking their tokens)."""
    finished: bool
    """The store already holds everything asked for: nothing to collect."""


def _lock(path: Path) -> int | None:
    """An exclusive, non-blocking hold on ``path``'s write lock (for the whole collection)."""
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(path / WRITE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise CheckpointError(
            f"another process is writing to {path} (a collection or a save holds "
            f"{WRITE_LOCK}); wait for it to finish, or collect into another directory"
        ) from e
    return fd


@contextmanager
def _no_readers(path: Path) -> Iterator[None]:
    """Hold the read lock exclusively (no reader is inside :func:`~codebook_lens.atomic.open_dir`)
    while files are deleted, as :mod:`codebook_lens.atomic` does."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(path / READ_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


class StoreWriter:
    """The manifest side of a store being collected (rank 0). Use :meth:`begin`; before the
    first new shard is written, :meth:`prepare`; :meth:`commit` after each round of shards;
    then :meth:`finish`; :meth:`close` always.

    A resumed store is left as it is until :meth:`prepare` (which drops a short last shard and
    marks the store incomplete), so a resume that fails while it checks the finished shards
    (other data, say) leaves a complete store complete."""

    def __init__(
        self, path: Path, m: dict[str, Any], lock: int | None, keep: list[dict] | None
    ) -> None:
        self.path, self.m, self._lock, self._keep = path, m, lock, keep
        self.n_done = len(m["shards"] if keep is None else keep)

    @property
    def data(self) -> Path:
        """The directory of the shard files."""
        return self.path / self.m["data_dir"]

    @property
    def plan(self) -> WritePlan:
        """The plan every process follows."""
        finished = (
            self.m["complete"] and self._keep is not None and self.n_done == len(self.m["shards"])
        )
        return WritePlan(
            str(self.data), self.m["store_id"], self.m["shard_seqs"], self.n_done, finished
        )

    @classmethod
    def begin(
        cls,
        path: str | os.PathLike[str],
        settings: dict[str, Any],
        collect: dict[str, Any],
        resume: bool,
        default_shard_seqs: int,
    ) -> StoreWriter:
        """Take ``path`` for a collection with layout ``settings`` (``shard_seqs`` None: the
        stored one when resuming, else ``default_shard_seqs``) and ``collect`` (data, codebooks,
        max_seqs): resume the store there if ``resume`` and its settings match (CheckpointError
        naming every mismatch otherwise), else start a new one (replacing a store there)."""
        p = check_save_target(path, STORE_KIND, overwrite=False)
        p.mkdir(parents=True, exist_ok=True)
        lock = _lock(p)
        try:
            old = _old_manifest(p) if holds_data(p) else None
            if resume and old is not None:
                return cls._resume(p, old, settings, collect, lock)
            settings = {**settings, "shard_seqs": settings["shard_seqs"] or default_shard_seqs}
            return cls._fresh(p, settings, collect, lock)
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise

    @classmethod
    def _fresh(
        cls, p: Path, settings: dict[str, Any], collect: dict[str, Any], lock: int | None
    ) -> StoreWriter:
        vname = f"v-{STORE_KIND.tag}-{uuid.uuid4().hex}"
        (p / vname).mkdir()
        m = new_manifest(settings, uuid.uuid4().hex, {}, collect)
        w = cls(p, {**m, "data_dir": vname}, lock, keep=None)
        w.write_manifest()
        with _no_readers(p):  # the previous store (any version) and leftovers go
            for e in os.listdir(p):
                old_version = e.startswith(f"v-{STORE_KIND.tag}-") and e != vname
                if old_version or e.endswith(".tmp"):
                    _remove(p / e)
        return w

    @classmethod
    def _resume(
        cls,
        p: Path,
        old: dict[str, Any],
        settings: dict[str, Any],
        collect: dict[str, Any],
        lock: int | None,
    ) -> StoreWriter:
        settings = {**settings, "shard_seqs": settings["shard_seqs"] or old["shard_seqs"]}
        new = {**settings, "data": collect["data"], "codebooks": collect["codebooks"]}
        diff = settings_mismatch(old, new)
        if diff:
            raise CheckpointError(
                f"{p} holds a code store collected with other settings ({'; '.join(diff)}). Run "
                "with the same settings to resume it, pass resume=False to replace it with a new "
                "collection, or collect into another directory"
            )
        try:
            check_shards(old, p / old["data_dir"])
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume the collection in {p}: {e}") from e
        want = collect["max_seqs"]
        if want is not None and want < old["n_seq"]:
            raise ValueError(
                f"{p} already holds {old['n_seq']} sequences, more than max_seqs={want}; pass "
                "resume=False to collect a new, smaller store there (it replaces this one)"
            )
        if old["complete"] and want == old["n_seq"]:
            return cls(p, old, lock, keep=old["shards"])  # finished: nothing to collect
        keep = [r for r in old["shards"] if r["n_seq"] == old["shard_seqs"]]  # a short last
        return cls(p, {**old, "collect": collect}, lock, keep=keep)  # shard is collected again

    def write_manifest(self) -> None:
        write_file(self.path / STORE_KIND.head, json.dumps(self.m, indent=1))

    def _tidy(self, n: int) -> None:
        """Delete shard files from index ``n``, the stale counts file and leftovers."""
        with _no_readers(self.path):
            for e in os.listdir(self.data):
                i = shard_index(e)
                if (i is not None and i >= n) or e == COUNTS_FILE or e.endswith(".tmp"):
                    (self.data / e).unlink()

    def prepare(self) -> None:
        """Before new shards are written: list only the shards a resume keeps (the store
        becomes incomplete) and delete every other shard file. Idempotent."""
        if self._keep is not None:
            self.m = with_shards(self.m, self._keep, complete=False, counts=None)
            self.write_manifest()
            self._tidy(len(self._keep))
            self._keep = None

    def check_end(self, n_shards: int) -> None:
        """CheckpointError if the data ended after ``n_shards`` shards, before the shards the
        store already lists (it was collected from longer, hence other, data)."""
        have = len(self.m["shards"])
        if n_shards < have:
            raise CheckpointError(
                f"the data ran out after {n_shards} shard(s), but {self.path} already holds "
                f"{have}: it was collected from other data. Pass the same data, or resume=False "
                "to collect anew"
            )

    def commit(self, records: list[dict[str, Any]]) -> None:
        """List the new complete shards ``records`` (the next indices, any order) in the
        manifest, replaced atomically (after :meth:`prepare`)."""
        if self._keep is not None:
            raise RuntimeError("StoreWriter.prepare() must run before new shards are committed")
        records = sorted(records, key=lambda r: r["index"])
        first = len(self.m["shards"])
        if [r["index"] for r in records] != list(range(first, first + len(records))):
            raise RuntimeError(f"shards {[r['index'] for r in records]} do not follow {first}")
        self.m = with_shards(self.m, self.m["shards"] + records, complete=False, counts=None)
        self.write_manifest()

    def finish(self) -> None:
        """Sum the shards' code counts into the counts file and mark the store complete."""
        if self._keep is not None:  # no new shard: the stored ones stay, leftovers go
            self._tidy(len(self.m["shards"]))
            self._keep = None
        m = self.m
        totals = {
            s: torch.zeros(m["shapes"][s][2], m["n_codes"][s], dtype=torch.long) for s in m["sites"]
        }
        for r in m["shards"]:
            sf = ShardFile.read(self.data / r["file"], "the store changed while it was written")
            for s in m["sites"]:
                totals[s] += sf.tensor(f"counts.{s}")
        rec = write_counts_file(self.data, m["store_id"], len(m["shards"]), totals)
        self.m = with_shards(m, m["shards"], complete=True, counts=rec)
        self.write_manifest()

    def close(self) -> None:
        """Release the write lock (idempotent)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _old_manifest(p: Path) -> dict[str, Any]:
    """The manifest at ``p``, checked."""
    with open_dir(p, STORE_KIND) as (head, _data):
        check_manifest(head, p / STORE_KIND.head)
        return head
