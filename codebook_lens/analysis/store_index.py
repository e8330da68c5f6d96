"""A per-code position index of one site of a code store: where each (head, code) fires,
without scanning the store.

One pass over the site's codes (chunk by chunk, bounded memory, no sort of the store) keeps
per (head, code):

- ``first``: its first ``m`` firings ordered by slot, then dataset order: exactly what
  :func:`~codebook_lens.analysis.top_examples` with ``order="slot"`` returns for ``n <= m``;
- ``sample``: a seeded uniform random sample of ``m`` of its firings (all of them when it fires
  fewer times), in random order: the ``m`` firings with the smallest of a pseudo-random key
  hashed from (position, head, seed) (a bottom-``m`` sketch: a store in memory and the same
  store on disk give the same sample). Only firings whose key lies below a bound set from the
  code's count (about ``m`` + 6 standard deviations + 16 expected) are kept while scanning,
  so a code may, with a chance below about 1e-8, end with fewer than ``m``;
- ``by_position``: exactly how often it fires at each position of a sequence.

A firing is a position where the code holds any slot at that head (a code repeated in several
slots counts once, at its lowest slot). Positions are flat: ``seq * seq_len + pos``; ``-1``
pads. A chunk costs a few vectorized passes; ``first`` sorts only firings of (slot, code)
pairs that still lack ``m``.

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
    def build(cls, store: CodeStore, site: str, m: int = 32, seed: int = 0) -> CodeIndex:
        """One pass over ``site``'s codes in ``store``, chunk by chunk."""
        if m < 1:
            raise ValueError(f"m={m}; keep at least one firing per code")
        h, n, p, k = store.n_heads(site), store.n_codes[site], store.seq_len, store.k(site)
        g = h * n
        pos_bins = g * p if g * p <= _MAX_BY_POSITION else 0
        by_pos = torch.zeros(pos_bins, dtype=torch.long)
        first = _FirstPerSlot(g, k, m, store.n_seq * p)
        # keep a firing when its random key is below a per-code bound that leaves about
        # m + 6 sd + 16 of them (its count is known): a superset of its bottom-m, cut at the end
        want = m + 6 * m**0.5 + 16
        bound = (want / store.code_counts(site).reshape(-1).double().clamp_min(1)).clamp(max=1)
        bound = (bound * 2**31).long()
        kept: list[tuple[Tensor, ...]] = []
        offs = (torch.arange(h) * n).view(1, h, 1)
        for start, c in store.chunks(site, max_seqs=256):
            d = dedupe_slots(c.long())  # [S, P, H, K]
            ok = (d >= 0).reshape(-1).nonzero().flatten()
            key = (d + offs).reshape(-1)[ok]
            pos, slot = start * p + ok // (h * k), ok % k
            if pos_bins:
                by_pos += torch.bincount(key * p + pos % p, minlength=pos_bins)
            first.add(key, pos, slot)
            rnd = _random_key(pos * h + (ok // k) % h, seed)  # per (position, head): no chunks
            r = rnd < bound[key]
            kept.append((key[r].int(), pos[r], slot[r].to(torch.int8), rnd[r].int()))
        fp, fs = first.result()
        sp, ss = _bottom(kept, g, m)
        shape = (h, n, m)
        return cls(
            site, m, seed, fp.view(shape), fs.view(shape).to(torch.int8), sp.view(shape),
            ss.view(shape).to(torch.int8), by_pos.view(h, n, p).int() if pos_bins else None,
        )  # fmt: skip

    @classmethod
    def for_store(cls, store: CodeStore, site: str, m: int = 32, seed: int = 0) -> CodeIndex:
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


class _FirstPerSlot:
    """Per (slot, group): its first ``m`` firings in dataset order, filled chunk by chunk
    (chunks come in dataset order; a full (slot, group) takes nothing more). Read per group in
    slot order, they hold its first ``m`` firings by slot, then dataset order."""

    def __init__(self, g: int, k: int, m: int, n_pos: int):
        dt = torch.int32 if n_pos < 2**31 else torch.int64
        self.g, self.k, self.m = g, k, m
        self.table = torch.full((k * g * m,), -1, dtype=dt)
        self.filled = torch.zeros(k * g, dtype=torch.long)

    def add(self, key: Tensor, pos: Tensor, slot: Tensor) -> None:
        gs = slot * self.g + key
        need = self.filled[gs] < self.m
        gs, pos = gs[need], pos[need]
        if gs.numel() == 0:
            return
        o = torch.sort(gs, stable=True).indices  # stable: dataset order within a group
        gs, pos = gs[o], pos[o]
        rank = _rank(gs) + self.filled[gs]
        fit = rank < self.m
        self.table[gs[fit] * self.m + rank[fit]] = pos[fit].to(self.table.dtype)
        self.filled = (self.filled + torch.bincount(gs, minlength=self.k * self.g)).clamp(
            max=self.m
        )

    def result(self) -> tuple[Tensor, Tensor]:
        """``[g * m]`` positions and slots, -1 padded: per group, slot 0's firings, then slot
        1's, ... up to ``m`` (each slot's are a prefix of its row, in dataset order)."""
        g, m = self.g, self.m
        pos = torch.full((g, m), -1, dtype=torch.long)
        slot = torch.full((g, m), -1, dtype=torch.long)
        filled = self.filled.view(self.k, g)
        used = torch.zeros(g, dtype=torch.long)
        col = torch.arange(m)
        for j in range(self.k):  # slots, a handful: one [g, m] table each, not [g, k * m]
            row = self.table.view(self.k, g, m)[j]
            src = col < filled[j][:, None]  # entry r of slot j goes to column used + r
            dst = used[:, None] + col
            ok = src & (dst < m)
            gi = torch.arange(g)[:, None].expand(g, m)[ok]
            pos[gi, dst[ok]] = row[ok].long()
            slot[gi, dst[ok]] = j
            used = (used + filled[j]).clamp(max=m)
        return pos.reshape(-1), slot.reshape(-1)


def _bottom(kept: list[tuple[Tensor, ...]], g: int, m: int) -> tuple[Tensor, Tensor]:
    """Per group, its ``m`` rows with the smallest random key (ties: earlier rows), in that
    order, as ``[g * m]`` tables of positions and slots (-1 padded)."""
    key, pos, slot, rnd = (torch.cat([t[i] for t in kept]) for i in range(4))  # narrow dtypes
    o = torch.sort(key.long() * 2**31 + rnd, stable=True).indices
    key, pos, slot = key[o].long(), pos[o], slot[o].long()
    rank = _rank(key)
    keep = rank < m
    flat = key[keep] * m + rank[keep]
    p = torch.full((g * m,), -1, dtype=torch.long)
    s = torch.full((g * m,), -1, dtype=torch.long)
    p[flat], s[flat] = pos[keep], slot[keep]
    return p, s


def _rank(key: Tensor) -> Tensor:
    """Within runs of equal ``key`` (sorted), 0, 1, 2, ..."""
    if key.numel() == 0:
        return key
    new = torch.ones_like(key, dtype=torch.bool)
    new[1:] = key[1:] != key[:-1]
    idx = torch.arange(key.numel())
    return idx - torch.cummax(torch.where(new, idx, 0), 0).values
