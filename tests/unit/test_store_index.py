"""CodeIndex against a brute-force scan: first firings by slot, the random sample, counts per
position; persisted beside a disk store, rebuilt when it does not belong to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens.analysis import top_examples
from codebook_lens.analysis.store import CodeStore
from codebook_lens.analysis.store_index import CodeIndex, index_file


def _store(seed: int, n_seq: int, p: int, h: int, k: int, n: int) -> CodeStore:
    g = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.2
    c = torch.multinomial(w, n_seq * p * h * k, True, generator=g).view(n_seq, p, h, k)
    c[torch.rand(c.shape, generator=g) < 0.05] = -1  # empty slots
    tok = torch.randint(0, 50, (n_seq, p), generator=g)
    return CodeStore({"s": c.to(torch.int16)}, {"s": n}, {"s": True}, tok, 50)


def _firings(c: np.ndarray, head: int, code: int) -> list[tuple[int, int]]:
    """(flat position, lowest slot) of every firing, in dataset order (plain loops)."""
    out = []
    s_, p_ = c.shape[:2]
    for s in range(s_):
        for p in range(p_):
            slots = [j for j in range(c.shape[3]) if c[s, p, head, j] == code]
            if slots:
                out.append((s * p_ + p, slots[0]))
    return out


def _check(store: CodeStore, idx: CodeIndex) -> None:
    c = store.codes["s"].numpy()
    h, n = idx.first.shape[:2]
    for head in range(h):
        for code in range(n):
            fir = _firings(c, head, code)
            want = sorted(fir, key=lambda x: x[1])[: idx.m]  # stable: dataset order in a slot
            got_p, got_s = idx.first[head, code], idx.first_slot[head, code]
            assert got_p[len(want) :].eq(-1).all()
            assert [(int(a), int(b)) for a, b in zip(got_p, got_s)][: len(want)] == want
            samp = idx.sample[head, code]
            samp = samp[samp >= 0].tolist()
            assert len(samp) == min(len(fir), idx.m) and len(set(samp)) == len(samp)
            assert set(samp) <= {f[0] for f in fir}
            slot_of = dict(fir)
            assert [slot_of[q] for q in samp] == idx.sample_slot[head, code][: len(samp)].tolist()
            bp = np.zeros(c.shape[1], dtype=np.int64)
            for q, _ in fir:
                bp[q % c.shape[1]] += 1
            assert idx.by_position[head, code].tolist() == bp.tolist()


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_seq=st.integers(1, 300),
    k=st.integers(1, 3),
    m=st.integers(1, 6),
)
def test_index_matches_brute_force(seed: int, n_seq: int, k: int, m: int) -> None:
    store = _store(seed, n_seq, 5, 2, k, 7)
    _check(store, CodeIndex.build(store, "s", m=m, seed=seed))


def test_first_equals_top_examples_and_sample_is_uniform() -> None:
    store = _store(0, 600, 8, 2, 2, 5)  # more than one chunk of 256 sequences
    idx = CodeIndex.build(store, "s", m=10)
    _check(store, idx)
    for head in range(2):
        for code in range(5):
            ex = top_examples(store, "s", code, head, n=10, order="slot")
            assert (ex.seq * 8 + ex.pos).tolist() == idx.first[head, code].tolist()
            assert ex.slot.tolist() == idx.first_slot[head, code].tolist()
    # the sample of a frequent code: each firing is kept with probability m / count; over
    # many seeds the share of firings in the first half of the store is about 1/2
    halves = []
    for seed in range(40):
        s = CodeIndex.build(store, "s", m=10, seed=seed).sample[0, 0]
        halves.append(float((s < 300 * 8).double().mean()))
    assert abs(np.mean(halves) - 0.5) < 0.06


def test_persisted_beside_a_disk_store_and_rebuilt_when_stale(tmp_path) -> None:
    store = _store(1, 40, 6, 2, 2, 5)
    store.save(tmp_path / "st")
    disk = CodeStore.open(tmp_path / "st")
    built = CodeIndex.for_store(disk, "s", m=4)
    f = index_file(disk, "s")
    assert f is not None and f.exists()
    again = CodeIndex.read(f, disk, "s", 4, 0)
    assert again is not None and torch.equal(again.first, built.first)
    assert torch.equal(again.sample, built.sample)
    assert torch.equal(again.by_position, built.by_position)
    assert CodeIndex.read(f, disk, "s", 5, 0) is None  # other settings
    # a new store in the same directory (another store id): the old index is not used
    _store(2, 40, 6, 2, 2, 5).save(tmp_path / "st", overwrite=True)
    disk2 = CodeStore.open(tmp_path / "st")
    assert CodeIndex.read(f, disk2, "s", 4, 0) is None
    fresh = CodeIndex.for_store(disk2, "s", m=4)
    assert torch.equal(fresh.first, CodeIndex.build(disk2, "s", m=4).first)
    # a corrupt file (out-of-range positions) is refused, then rebuilt
    raw = bytearray(f.read_bytes())
    f.write_bytes(bytes(raw[:-64]) + b"\xff" * 64)
    assert CodeIndex.read(f, disk2, "s", 4, 0) is None
    f.write_bytes(b"garbage")
    assert CodeIndex.read(f, disk2, "s", 4, 0) is None
    assert torch.equal(CodeIndex.for_store(disk2, "s", m=4).first, fresh.first)


def test_bad_m() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CodeIndex.build(_store(0, 2, 2, 1, 1, 3), "s", m=0)


def test_code_page_from_the_index_equals_the_scan() -> None:
    """The browser's code page read from the index against the same page by passes over the
    store (asking for more examples than the index keeps takes that path)."""
    from codebook_lens.browse.codes import code_stats
    from codebook_lens.browse.search import SearchIndex

    store = _store(3, 300, 8, 2, 2, 40)
    index = SearchIndex(store)
    vocab = [f"t{i}" for i in range(50)]
    m = index.code_index("s").m
    for head in range(2):
        for code in (0, 1, 7, 39):
            fast = code_stats(store, index, "s", head, code, vocab, [], n_examples=10)
            slow = code_stats(store, index, "s", head, code, vocab, [], n_examples=m + 1)
            assert fast["top"] == slow["top"][:10]
            for key in ("count", "by_position", "n_tokens", "labels"):
                assert fast[key] == slow[key]
            if fast["count"] <= m:  # the sample holds every firing: exact token counts
                assert fast["tokens"] == slow["tokens"]
                assert fast["tokens_sampled"] == fast["count"]
            else:
                assert fast["tokens_sampled"] == m
                assert sum(t["count"] for t in fast["tokens"]) <= m
            # random examples: distinct firings of the code, seeded
            again = code_stats(store, index, "s", head, code, vocab, [], n_examples=10)
            assert again["random"] == fast["random"]
            fired = {(e["seq"], e["pos"]) for e in slow["top"]} if slow["count"] <= m else None
            for e in fast["random"]:
                assert e["fires"][e["center"]]
                if fired is not None:
                    assert (e["seq"], e["pos"]) in fired
