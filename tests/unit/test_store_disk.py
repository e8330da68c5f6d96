"""A store on disk (several memory-mapped shards) answers every query exactly as the same store
in memory: counts, positions, rows, chunks, attribution, examples, the code-token table, and
the browser's search and code pages. Shards are mapped, not copied."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codebook_lens.analysis import (
    CodeStore,
    code_token_table,
    feature_attribution,
    label_attribution,
    top_examples,
)
from codebook_lens.browse.codes import code_stats, context_view
from codebook_lens.browse.search import SearchIndex

Z, M = "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"


def random_store(seed: int, n_seq=11, pos=7, heads=3, k=2, n_codes=(9, 300), vocab=13):
    g = torch.Generator().manual_seed(seed)

    def codes(shape, n):
        c = torch.randint(0, n, shape, generator=g)
        c[torch.rand(shape, generator=g) < 0.2] = -1
        return c

    return CodeStore.from_codes(
        {Z: codes((n_seq, pos, heads, k), n_codes[0]), M: codes((n_seq, pos, 1), n_codes[1])},
        {Z: n_codes[0], M: n_codes[1]},
        torch.randint(0, vocab, (n_seq, pos), generator=g),
        d_vocab=vocab,
    )


def on_disk(store: CodeStore, path: Path, shard_seqs: int) -> CodeStore:
    store.save(path, shard_seqs=shard_seqs)
    return CodeStore.open(path)


def _same(a, b) -> None:
    """Equal results: tensors bit-exact, dataclasses and dicts field by field."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif hasattr(a, "__dataclass_fields__"):
        for f in a.__dataclass_fields__:
            _same(getattr(a, f), getattr(b, f))
    else:
        assert a == b


def check_equal(mem: CodeStore, disk: CodeStore) -> None:
    """Every store query and analysis function gives the same result on both stores."""
    assert (disk.sites, disk.n_seq, disk.seq_len, disk.nbytes) == (
        mem.sites, mem.n_seq, mem.seq_len, mem.nbytes
    )  # fmt: skip
    _same(mem.tokens, disk.tokens)
    _same(mem.require_tokens(), disk.require_tokens())
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 4, (mem.n_seq, mem.seq_len), generator=g)
    feature = torch.rand(mem.n_seq, mem.seq_len, generator=g) < 0.3
    seqs = torch.randint(0, mem.n_seq, (5,), generator=g)
    _same(mem.token_rows(seqs), disk.token_rows(seqs))
    for site in mem.sites:
        _same(mem.codes[site], disk.codes[site])
        _same(mem.get(site), disk.get(site))
        _same(mem.code_counts(site), disk.code_counts(site))
        _same(mem.code_rows(site, seqs), disk.code_rows(site, seqs))
        _same(mem.code_range(site, 2, mem.n_seq - 1), disk.code_range(site, 2, mem.n_seq - 1))
        pieces = [c for _, c in disk.chunks(site, max_seqs=2)]
        _same(torch.cat(pieces), mem.codes[site])
        _same(label_attribution(mem, labels, site, 4), label_attribution(disk, labels, site, 4))
        _same(feature_attribution(mem, feature, site), feature_attribution(disk, feature, site))
        for offset in [o for o in (0, -1, 2) if abs(o) < mem.seq_len]:
            _same(code_token_table(mem, site, 3, offset), code_token_table(disk, site, 3, offset))
        counts = mem.code_counts(site).sum(0)
        for code in {0, int(counts.argmax()), int(counts.argmin())}:
            for head in (None, 0, -1):
                _same(mem.fires(site, code, head), disk.fires(site, code, head))
                _same(mem.positions(site, code, head), disk.positions(site, code, head))
                for order in ("slot", "random"):
                    for n in (0, 3, 1000):
                        a = top_examples(mem, site, code, head, n, 2, 1, order, seed=code)
                        _same(a, top_examples(disk, site, code, head, n, 2, 1, order, seed=code))
    _same_browser(mem, disk, labels, feature)


def _same_browser(mem: CodeStore, disk: CodeStore, labels, feature) -> None:
    vocab = [f"t{i}" for i in range(mem.d_vocab)]
    names = [f"label {i}" for i in range(4)]
    im, idisk = SearchIndex(mem, labels, 4), SearchIndex(disk, labels, 4)
    _same(im.counts, idisk.counts)
    _same(im.feature_ranking(feature).metrics(), idisk.feature_ranking(feature).metrics())
    _same(im.label_ranking(1).metrics(), idisk.label_ranking(1).metrics())
    for site in mem.sites:
        code = int(mem.code_counts(site)[0].argmax())
        a = code_stats(mem, im, site, 0, code, vocab, names, n_examples=4)
        assert a == code_stats(disk, idisk, site, 0, code, vocab, names, n_examples=4)
    for seq in (0, mem.n_seq - 1):
        assert context_view(mem, seq, vocab, labels, names) == context_view(
            disk, seq, vocab, labels, names
        )


def test_multi_shard_disk_store_equals_memory(tmp_path):
    mem = random_store(0)
    disk = on_disk(mem, tmp_path / "s", shard_seqs=3)
    assert disk.n_shards == 4 and disk.path == tmp_path / "s" and disk.has_counts
    check_equal(mem, disk)
    back = CodeStore.load(tmp_path / "s")  # into memory, hashes and values checked
    assert back.path is None and back.n_shards == 1
    check_equal(mem, back)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    n_seq=st.integers(1, 9),
    pos=st.integers(1, 5),
    heads=st.integers(1, 3),
    k=st.integers(1, 3),
    n_codes=st.integers(1, 40),
    shard=st.integers(1, 4),
)
def test_disk_equals_memory_on_random_layouts(
    tmp_path_factory, seed, n_seq, pos, heads, k, n_codes, shard
):
    mem = random_store(seed, n_seq, pos, heads, k, (n_codes, 3 * n_codes), vocab=7)
    disk = on_disk(mem, tmp_path_factory.mktemp("h") / "s", shard_seqs=shard)
    assert disk.n_shards == -(-n_seq // shard)
    check_equal(mem, disk)


def _mapped_files(ptr: int) -> set[str]:
    """Files mapped at address ``ptr`` in this process (Linux /proc/self/maps)."""
    out = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi and len(parts) == 6:
            out.add(parts[5].strip())
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_chunks_are_memory_mapped_views_of_the_shard_files(tmp_path):
    mem = random_store(1, n_seq=40, pos=16)
    disk = on_disk(mem, tmp_path / "s", shard_seqs=16)
    data = disk.path / disk.manifest["data_dir"]
    for i, (_, c) in enumerate(disk.chunks(Z)):
        files = _mapped_files(c.data_ptr())
        assert str(data / f"shard-{i:05d}.safetensors") in files, files
        c.fill_(5)  # copy-on-write: the file is never changed
    _same(disk.codes[Z], mem.codes[Z])
    _, t = next(disk.token_chunks())
    assert str(data / "shard-00000.safetensors") in _mapped_files(t.data_ptr())


def test_empty_and_single_sequence_stores(tmp_path):
    for n_seq in (0, 1):
        mem = random_store(2, n_seq=n_seq)
        disk = on_disk(mem, tmp_path / f"s{n_seq}", shard_seqs=2)
        assert disk.n_seq == n_seq and disk.n_shards == max(n_seq, 1)
        _same(disk.codes[Z], mem.codes[Z])
        _same(disk.code_counts(Z), mem.code_counts(Z))
        _same(disk.fires(Z, 0), mem.fires(Z, 0))
        _same(CodeStore.load(tmp_path / f"s{n_seq}").tokens, mem.tokens)


def test_store_without_tokens(tmp_path):
    g = torch.Generator().manual_seed(0)
    mem = CodeStore.from_codes({"a": torch.randint(-1, 5, (6, 4, 2), generator=g)}, 5)
    disk = on_disk(mem, tmp_path / "s", shard_seqs=4)
    assert not disk.has_tokens and disk.tokens is None
    _same(disk.get("a"), mem.get("a"))
    for store in (mem, disk):
        with pytest.raises(ValueError, match="keep_tokens=True"):
            top_examples(store, "a", 1)
        with pytest.raises(ValueError, match="keep_tokens=True"):
            next(store.token_chunks())


def test_row_and_chunk_arguments_are_checked(tmp_path):
    disk = on_disk(random_store(3), tmp_path / "s", shard_seqs=4)
    with pytest.raises(IndexError, match="11 sequences"):
        disk.code_rows(Z, torch.tensor([11]))
    with pytest.raises(KeyError, match="Did you mean"):
        next(disk.chunks("blocks.0.attn.hook_q"))
    with pytest.raises(ValueError, match="positive"):
        next(disk.chunks(Z, max_seqs=-1))
    assert os.path.exists(disk.path / disk.manifest["data_dir"] / "counts.safetensors")
