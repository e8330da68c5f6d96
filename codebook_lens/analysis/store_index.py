"""A per-code position index of one site of a code store: where each (head, code) fires,
without scanning the store.

One pass over the site's codes (chunk by chunk, bounded memory) keeps per (head, code):

- ``first``: its first ``m`` firings ordered by slot, then dataset order: exactly what
  :func:`~codebook_lens.analysis.top_examples` with ``order="slot"`` returns for ``n <= m``;
- ``sample``: a seeded uniform random sample of ``m`` of its firings (all of them when it fires
  fewer times), in random order: the ``m`` firings with the smallest of a pseudo-random key
  hashed from (position, head, seed) (a bottom-``m`` sketch: chunks merge exactly, and a store
  in memory and the same store on disk give the same sample);
- ``by_position``: exactly how often it fires at each position of a sequence.

A firing is a position where the code holds any slot at that head (a code repeated in several
slots counts once, at its lowest slot). Positions are flat: ``seq * seq_len + pos``; ``-1``
pads. Candidates are filtered against the running ``m``-th best before they are sorted, so a
chunk costs a few vectorized passes, and a sort only over what can still enter the index.

A store on disk (``CodeStore.open``) keeps the index next to it, ``code-index.<site>.
safetensors`` in the store directory, written atomically; its metadata names the store id,
sizes and settings, and it is rebuilt when they do not match (a new collection in the same
directory) or when its structure or values are off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from codebook_lens.analysis.store import CodeStore, dedupe_slots
from codebook_lens.atomic import write_file

__all__ = ["CodeIndex", "INDEX_FORMAT"]

INDEX_FORMAT = "codebook_lens.code_index.v1"
_MAX_BY_POSITION = 2**27  # head x codes x seq_len bins kept exactly; above, None (scan instead)
_SORT_AT = 1 << 22  # merge buffered candidates once this many wait


@dataclass
class CodeIndex:
    """The index of one site (see the module docstring)."""

    site: str
    """The site."""
    m: int
    """Firings kept per (head, code) in ``first`` and in ``sample``."""
    seed: int
    """Seed of the random keys behind ``sample``."""
    first: Int[Tensor, "head n_codes m"]
    """First firings by slot, then dataset order (flat positions, -1 pads)."""
    first_slot: Int[Tensor, "head n_codes m"]
    """Their slots (int8, -1 pads)."""
    sample: Int[Tensor, "head n_codes m"]
    """A uniform random sample of firings, in random order (flat positions, -1 pads)."""
    sample_slot: Int[Tensor, "head n_codes m"]
    """Their slots (int8, -1 pads)."""
    by_position: Int[Tensor, "head n_codes pos"] | None
    """Firings per position of a sequence (None when head x codes x seq_len is too large)."""

    @classmethod
    def build(cls, store: CodeStore, site: str, m: int = 64, seed: int = 0) -> CodeIndex:
        """One pass over ``site``'s codes in ``store`` (chunks of a fixed size, so the random
        keys, hence ``sample``, depend only on the store and ``seed``)."""
        if m < 1:
            raise ValueError(f"m={m}; keep at least one firing per code")
        h, n, p = store.n_heads(site), store.n_codes[site], store.seq_len
        acc = _Acc(h * n, m, store.k(site))
        pos_bins = h * n * p if h * n * p <= _MAX_BY_POSITION else 0
        by_pos = torch.zeros(pos_bins, dtype=torch.long)
        offs = (torch.arange(h) * n).view(1, h, 1)
        for start, c in store.chunks(site, max_seqs=256):  # keys do not depend on chunks
            d = dedupe_slots(c.long())  # [S, P, H, K]
            key = (d + offs).reshape(-1)
            ok = (d >= 0).reshape(-1)
            flat = torch.arange(key.numel())
            k, hk = d.shape[3], d.shape[2] * d.shape[3]
            pos = start * p + flat // hk
            slot = flat % k
            rnd = _random_key(pos * h + (flat // k) % h, seed)
            key, pos, slot, rnd = key[ok], pos[ok], slot[ok], rnd[ok]
            if pos_bins:
                by_pos += torch.bincount(key * p + pos % p, minlength=pos_bins)
            acc.add(key, pos, slot, rnd)
        first, fslot, sample, sslot = acc.result()
        shape = (h, n, m)
        return cls(
            site, m, seed, first.view(shape), fslot.view(shape).to(torch.int8),
            sample.view(shape), sslot.view(shape).to(torch.int8),
            by_pos.view(h, n, p).int() if pos_bins else None,
        )  # fmt: skip

    @classmethod
    def for_store(cls, store: CodeStore, site: str, m: int = 64, seed: int = 0) -> CodeIndex:
        """The index of ``site``: read from beside a disk store when it matches, else built
        (and, for a disk store, saved there atomically for the next open)."""
        file = index_file(store, site)
        if file is not None and file.exists():
            got = cls.read(file, store, site, m, seed)
            if got is not None:
                return got
        idx = cls.build(store, site, m, seed)
        if file is not None:
            idx.write(file, store)
        return idx

    def write(self, file: str | os.PathLike[str], store: CodeStore) -> None:
        """Save atomically as safetensors, with what :meth:`read` checks in the metadata."""
        t = {"first": self.first, "first_slot": self.first_slot.to(torch.int8)}
        t |= {"sample": self.sample, "sample_slot": self.sample_slot.to(torch.int8)}
        if self.by_position is not None:
            t["by_position"] = self.by_position
        write_file(file, save(t, metadata=_meta(store, self.site, self.m, self.seed)))

    @classmethod
    def read(
        cls, file: str | os.PathLike[str], store: CodeStore, site: str, m: int, seed: int
    ) -> CodeIndex | None:
        """The index saved in ``file`` if it belongs to ``store`` (same store id, sizes and
        settings) and its tensors have the right keys, shapes and value ranges; else None."""
        from safetensors import safe_open

        try:
            with safe_open(str(file), "pt") as f:
                if f.metadata() != _meta(store, site, m, seed):
                    return None
            t = load_file(str(file))
        except (OSError, SafetensorError, ValueError):
            return None
        h, n, p = store.n_heads(site), store.n_codes[site], store.seq_len
        if not _valid(t, (h, n, m), store.n_seq * p, store.k(site)):
            return None
        bp = t.get("by_position")
        if bp is not None and (bp.shape != (h, n, p) or bool((bp < 0).any())):
            return None
        return cls(
            site, m, seed, t["first"], t["first_slot"], t["sample"], t["sample_slot"], bp,
        )  # fmt: skip


def index_file(store: CodeStore, site: str) -> Path | None:
    """Where a disk store keeps ``site``'s index (None for a store in memory)."""
    if store.path is None:
        return None
    return Path(store.path) / f"code-index.{site}.safetensors"


def _random_key(ids: Tensor, seed: int) -> Tensor:
    """A 31-bit pseudo-random key per id (splitmix64 of ``id`` and ``seed``, in numpy's
    wrapping uint64 arithmetic): the same for a firing however the store is chunked."""
    x = ids.numpy().astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(33)).astype(np.int64))


def _meta(store: CodeStore, site: str, m: int, seed: int) -> dict[str, str]:
    man = store.manifest or {}
    return {
        "format": INDEX_FORMAT, "store_id": str(man.get("store_id")), "site": site,
        "n_seq": str(store.n_seq), "seq_len": str(store.seq_len), "m": str(m), "seed": str(seed),
        "n_codes": str(store.n_codes[site]), "heads": str(store.n_heads(site)),
        "k": str(store.k(site)),
    }  # fmt: skip


def _valid(t: dict[str, Tensor], shape: tuple[int, int, int], n_pos: int, k: int) -> bool:
    need = ("first", "first_slot", "sample", "sample_slot")
    if any(name not in t or tuple(t[name].shape) != shape for name in need):
        return False
    for name in ("first", "sample"):
        if t[name].dtype != torch.int64 or t[name + "_slot"].dtype != torch.int8:
            return False
        v, s = t[name], t[name + "_slot"].long()
        if bool(((v < -1) | (v >= n_pos)).any()) or bool(((s < -1) | (s >= k)).any()):
            return False
        if not torch.equal(v < 0, s < 0):
            return False
    return True


class _Acc:
    """The running first-``m`` (by slot, then position) and bottom-``m`` (by random key) of
    every group, with candidates buffered and filtered against the current ``m``-th best."""

    def __init__(self, n_groups: int, m: int, k: int):
        self.g, self.m, self.k = n_groups, m, k
        z = torch.zeros(0, dtype=torch.long)
        self.first = (z, z, z)  # key, pos, slot of the kept entries
        self.rand = (z, z, z, z)  # key, pos, slot, random key
        self.f_thr = torch.full((n_groups,), k, dtype=torch.long)  # slot bound
        self.r_thr = torch.full((n_groups,), 2**31, dtype=torch.long)  # random-key bound
        self.buf_f: list[tuple[Tensor, ...]] = []
        self.buf_r: list[tuple[Tensor, ...]] = []
        self.n_buf = 0

    def add(self, key: Tensor, pos: Tensor, slot: Tensor, rnd: Tensor) -> None:
        f = slot < self.f_thr[key]  # a later firing in the same or a later slot cannot enter
        r = rnd < self.r_thr[key]
        self.buf_f.append((key[f], pos[f], slot[f]))
        self.buf_r.append((key[r], pos[r], slot[r], rnd[r]))
        self.n_buf += int(f.sum()) + int(r.sum())
        if self.n_buf >= _SORT_AT:
            self._merge()

    def _merge(self) -> None:
        if self.buf_f:
            cols = [torch.cat([a, *(b[i] for b in self.buf_f)]) for i, a in enumerate(self.first)]
            self.first = _keep_first(cols, cols[0] * self.k + cols[2], self.m)
            self.f_thr = _bound(self.first[0], self.first[2], self.g, self.m, self.k)
        if self.buf_r:
            cols = [torch.cat([a, *(b[i] for b in self.buf_r)]) for i, a in enumerate(self.rand)]
            self.rand = _keep_first(cols, cols[0] * 2**31 + cols[3], self.m)
            self.r_thr = _bound(self.rand[0], self.rand[3], self.g, self.m, 2**31)
        self.buf_f, self.buf_r, self.n_buf = [], [], 0

    def result(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self._merge()
        fp, fs = _table(self.first[0], self.first[1], self.first[2], self.g, self.m)
        rp, rs = _table(self.rand[0], self.rand[1], self.rand[2], self.g, self.m)
        return fp, fs, rp, rs


def _keep_first(cols: list[Tensor], order_key: Tensor, m: int) -> tuple[Tensor, ...]:
    """The rows of ``cols`` whose rank within their group (``cols[0]``) by ``order_key`` (ties:
    earlier rows first) is below ``m``, sorted by group then ``order_key``."""
    o = torch.sort(order_key, stable=True).indices
    cols = [c[o] for c in cols]
    return tuple(c[_rank(cols[0]) < m] for c in cols)


def _rank(key: Tensor) -> Tensor:
    """Within runs of equal ``key`` (sorted), 0, 1, 2, ..."""
    if key.numel() == 0:
        return key
    new = torch.ones_like(key, dtype=torch.bool)
    new[1:] = key[1:] != key[:-1]
    idx = torch.arange(key.numel())
    return idx - torch.cummax(torch.where(new, idx, 0), 0).values


def _bound(key: Tensor, val: Tensor, g: int, m: int, empty: int) -> Tensor:
    """Per group: ``val`` of its ``m``-th kept row when it has ``m`` rows, else ``empty``.
    Rows are sorted by group and ``val``, so the last row of a full group holds it."""
    out = torch.full((g,), empty, dtype=torch.long)
    last = _rank(key) == m - 1
    out[key[last]] = val[last]
    return out


def _table(key: Tensor, pos: Tensor, slot: Tensor, g: int, m: int) -> tuple[Tensor, Tensor]:
    """Rows sorted by group into ``[g * m]`` tables of positions and slots, -1 padded."""
    flat = key * m + _rank(key)
    p = torch.full((g * m,), -1, dtype=torch.long)
    s = torch.full((g * m,), -1, dtype=torch.long)
    p[flat], s[flat] = pos, slot
    return p, s
