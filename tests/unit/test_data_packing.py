"""Block packing and streaming against a brute-force reference."""

from __future__ import annotations

import random

import pytest
import torch

from codebook_lens.data import (
    BlockStream,
    encode_texts,
    file_texts,
    iter_blocks,
    pack_blocks,
    pack_labelled_blocks,
    pydoc_texts,
    shard_batch,
)

BOS, EOS = 1000, 1001


def brute_blocks(docs, block_len, bos=None, eos=None):
    """Reference: one Python list, cut by slicing."""
    stream = []
    for d in docs:
        stream += list(d) + ([eos] if eos is not None else [])
    body = block_len - (bos is not None)
    out = []
    for i in range(0, len(stream) - body + 1, body):
        out.append(([bos] if bos is not None else []) + stream[i : i + body])
    return out


def random_docs(seed, n=40, max_len=30):
    rng = random.Random(seed)
    return [[rng.randrange(500) for _ in range(rng.randrange(0, max_len))] for _ in range(n)]


def char_tokenizer(texts):
    """A toy tokenizer: one id per character."""
    return [[ord(c) % 500 for c in t] for t in texts]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("block_len", [2, 7, 16])
@pytest.mark.parametrize("bos,eos", [(None, None), (BOS, EOS), (None, EOS), (BOS, None)])
def test_pack_blocks_matches_brute_force(seed, block_len, bos, eos):
    docs = random_docs(seed)
    want = brute_blocks(docs, block_len, bos, eos)
    got = pack_blocks(docs, block_len, bos, eos)
    assert got.shape == (len(want), block_len)
    assert got.tolist() == want


def test_pack_keeps_the_tail_when_asked():
    docs = [[1, 2, 3], [4, 5]]
    got = pack_blocks(docs, 4, bos_id=9, eos_id=8, drop_last=False, pad_id=0)
    assert got.tolist() == [[9, 1, 2, 3], [9, 8, 4, 5], [9, 8, 0, 0]]


def test_iter_blocks_streams_in_groups_without_holding_everything():
    docs = random_docs(0, n=200)
    groups = list(iter_blocks(iter(docs), 8, BOS, EOS))
    assert all(g.shape[0] == 1 and g.shape[1] >= 1 for g in groups)
    assert len(groups) > 10  # emitted as it goes, not at the end
    assert torch.cat([g[0] for g in groups]).tolist() == brute_blocks(docs, 8, BOS, EOS)


def test_labelled_packing_keeps_labels_aligned():
    docs = random_docs(1)
    labels = [[t % 7 for t in d] for d in docs]
    tokens, labs = pack_labelled_blocks(docs, labels, 9, BOS, EOS)
    special = (tokens == BOS) | (tokens == EOS)
    assert (labs[special] == -1).all()
    assert torch.equal(labs[~special], tokens[~special] % 7)
    assert tokens.tolist() == brute_blocks(docs, 9, BOS, EOS)
    with pytest.raises(ValueError, match="one label per token"):
        pack_labelled_blocks([[1, 2]], [[0]], 4)


def test_block_stream_matches_brute_force_batches():
    texts = ["".join(chr(97 + (i * j) % 26) for j in range(i % 23)) for i in range(300)]
    docs = char_tokenizer(texts)
    blocks = brute_blocks(docs, 10, BOS, EOS)
    stream = BlockStream(texts, char_tokenizer, 10, 4, bos_id=BOS, eos_id=EOS, tokenize_batch=7)
    got = torch.cat(list(stream))
    n = len(blocks) // 4 * 4
    assert got.tolist() == blocks[:n]


def test_block_stream_shards_reassemble_the_global_batch():
    texts = [f"text number {i} " * (i % 5 + 1) for i in range(200)]
    full = list(BlockStream(texts, char_tokenizer, 12, 6, bos_id=BOS, eos_id=EOS))
    shards = [
        list(BlockStream(texts, char_tokenizer, 12, 6, BOS, EOS, rank=r, world_size=3))
        for r in range(3)
    ]
    assert all(len(s) == len(full) for s in shards)
    for i, batch in enumerate(full):
        assert torch.equal(torch.cat([s[i] for s in shards]), batch)
        assert torch.equal(shard_batch(batch, 1, 3), shards[1][i])
    with pytest.raises(ValueError, match="divisible"):
        BlockStream(texts, char_tokenizer, 12, 6, world_size=4)


def test_shuffled_stream_is_a_seeded_permutation_and_repeats():
    texts = [f"doc {i} " * 3 for i in range(300)]
    plain = torch.cat(list(BlockStream(texts, char_tokenizer, 8, 4, BOS, EOS)))
    s = BlockStream(texts, char_tokenizer, 8, 4, BOS, EOS, shuffle_buffer=32, seed=3)
    a, b = torch.cat(list(s)), torch.cat(list(s))
    assert torch.equal(a, b)  # seeded
    assert not torch.equal(a, plain)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, plain.tolist()))
    n = plain.shape[0] // 4
    rep = BlockStream(texts, char_tokenizer, 8, 4, BOS, EOS, shuffle_buffer=32, seed=3, repeat=True)
    it = iter(rep)
    epoch0 = torch.cat([next(it) for _ in range(n)])
    epoch1 = torch.cat([next(it) for _ in range(n)])
    assert torch.equal(epoch0, a)
    assert not torch.equal(epoch0, epoch1)  # a fresh order each epoch
    assert sorted(map(tuple, epoch1.tolist())) == sorted(map(tuple, a.tolist()))


def test_stream_errors_are_clear():
    with pytest.raises(ValueError, match="no complete block"):
        list(BlockStream(["ab"], char_tokenizer, 64, 2))
    with pytest.raises(TypeError, match="str"):
        encode_texts(char_tokenizer, [b"bytes"])
    with pytest.raises(TypeError, match="cannot tokenize"):
        encode_texts(object(), ["x"])


def test_file_texts_units(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("four")
    (tmp_path / "c.md").write_text("ignored")
    assert list(file_texts(tmp_path)) == ["one\ntwo\n\nthree\n", "four"]
    assert list(file_texts(tmp_path, unit="line")) == ["one", "two", "three", "four"]
    assert list(file_texts(tmp_path / "a.txt", unit="paragraph")) == ["one\ntwo", "three"]
    with pytest.raises(FileNotFoundError):
        list(file_texts(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unit"):
        list(file_texts(tmp_path, unit="word"))


def test_pydoc_corpus_ships_with_python():
    texts = pydoc_texts()
    assert len(texts) > 50
    assert 300_000 < sum(map(len, texts)) < 1_000_000
    assert texts == pydoc_texts()  # deterministic order
