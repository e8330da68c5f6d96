"""A run's data: every local format gives the same token batches, held-out documents never
reach training, tokenized columns are cut as documented, and bad data is one clear error.

Datasets are written by ``datasets`` itself into temporary directories (tests/hf_fixtures.py);
documents carry a marker word ``doc{i}`` that the word-level tokenizer maps to one token
(id ``i + 1``), so which documents a batch holds is read off its tokens. Nothing here may use
the network: the ``no_network`` fixture makes every socket connection fail.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens.pipeline.sources import (
    DataConfig,
    TokenSource,
    check_context,
    find_data,
    held_out_mask,
)
from tests.conftest import make_model
from tests.hf_fixtures import FORMATS, marked_texts, save_texts, word_tokenizer

datasets = pytest.importorskip("datasets")

N_DOCS, VOCAB_WORDS, CTX, BATCH = 120, 20, 16, 4


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def texts():
    return marked_texts(N_DOCS, vocab=VOCAB_WORDS)


@pytest.fixture(scope="module")
def tok():
    words = [f"doc{i}" for i in range(N_DOCS)] + [f"w{j}" for j in range(VOCAB_WORDS)]
    return word_tokenizer(words)


def _cfg(path: str, **kw) -> DataConfig:
    base = dict(context_len=CTX, batch_size=BATCH, eval_fraction=0.1, eval_tokens=4 * CTX)
    return DataConfig(path=path, **{**base, **kw})


# ------------------------------------------------------------------ independent recounts
def _slow_held_out(index: int, fraction: float, seed: int) -> bool:
    """splitmix64 on Python ints (the reference for held_out_mask)."""
    m = 2**64 - 1
    z = (index + (seed + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    return (z >> 11) < int(fraction * 2**53)


def _pack(docs: list[list[int]], ctx: int, bos: int | None, eos: int | None) -> torch.Tensor:
    """Documents packed by hand: doc + [eos] concatenated, cut into ctx - 1 (+ BOS) tokens."""
    stream: list[int] = []
    for d in docs:
        stream += list(d) + ([eos] if eos is not None else [])
    body = ctx - (bos is not None)
    rows = [
        ([bos] if bos is not None else []) + stream[i : i + body]
        for i in range(0, len(stream) - body + 1, body)
    ]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, ctx)


def _split_docs(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    held = [i for i in range(n) if _slow_held_out(i, fraction, seed)]
    return [i for i in range(n) if i not in set(held)], held


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _markers(blocks: torch.Tensor) -> set[int]:
    """Document numbers whose marker token (id i + 1) is in ``blocks``."""
    ids = blocks[(blocks >= 1) & (blocks <= N_DOCS)]
    return {int(i) - 1 for i in ids.unique()}


# ------------------------------------------------------------------ held-out choice
@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 2**40), min_size=1, max_size=50),
    st.floats(0.001, 0.999),
    st.integers(0, 2**31),
)
def test_held_out_mask_matches_a_plain_loop(index, fraction, seed):
    got = held_out_mask(np.array(index), fraction, seed)
    assert got.tolist() == [_slow_held_out(i, fraction, seed) for i in index]


def test_held_out_share_is_the_fraction_and_seeded():
    idx = np.arange(200_000)
    for f in (0.01, 0.1, 0.5):
        share = held_out_mask(idx, f, 0).mean()
        assert abs(share - f) < 4 * math.sqrt(f * (1 - f) / len(idx))
    assert not np.array_equal(held_out_mask(idx, 0.1, 0), held_out_mask(idx, 0.1, 1))


# ------------------------------------------------------------------ formats
@pytest.fixture(scope="module")
def reference(texts, tok, tmp_path_factory):
    """Batches of the JSON lines file, read map-style: what every other format must give."""
    path = save_texts(tmp_path_factory.mktemp("ref"), texts, "jsonl")
    src = TokenSource(_cfg(path, shuffle_buffer=8), tok)
    it = src.train_batches()
    return (
        [next(it) for _ in range(8)],
        src.eval_batches(),
        list(src.collect_batches(10 * CTX, batch_size=3)),
    )


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_batches(fmt, streaming, texts, tok, reference, tmp_path):
    path = save_texts(tmp_path, texts, fmt)
    src = TokenSource(_cfg(path, shuffle_buffer=8, streaming=streaming), tok)
    it = src.train_batches()
    train, held, collect = reference
    for want in train:
        assert torch.equal(next(it), want)
    assert all(torch.equal(a, b) for a, b in zip(src.eval_batches(), held, strict=True))
    got = list(src.collect_batches(10 * CTX, batch_size=3))
    assert all(torch.equal(a, b) for a, b in zip(got, collect, strict=True))


def test_batches_are_the_documents_packed_by_hand(texts, tok, tmp_path):
    src = TokenSource(_cfg(save_texts(tmp_path, texts, "parquet"), shuffle_buffer=0), tok)
    train_docs, held_docs = _split_docs(N_DOCS, 0.1, 0)
    ids = _ids(tok, texts)
    want_train = _pack([ids[i] for i in train_docs], CTX, 0, 0)
    want_held = _pack([ids[i] for i in held_docs], CTX, 0, 0)

    it = src.train_batches()
    n = len(want_train) // BATCH
    got = torch.cat([next(it) for _ in range(n)])
    assert torch.equal(got, want_train[: n * BATCH])
    assert torch.equal(next(it), want_train[:BATCH])  # the next epoch starts over (no shuffle)

    held = src.eval_batches()
    assert [b.shape[0] for b in held] == [BATCH]  # 4 * CTX tokens: 4 sequences, one batch
    assert torch.equal(torch.cat(held), want_held[:4])
    assert src.eval_batches() is not held and all(
        a is b for a, b in zip(src.eval_batches(), held, strict=True)
    )  # the same tensors on every call

    collect = list(src.collect_batches(7 * CTX - 3, batch_size=3))  # rounds up to 7 blocks
    assert [b.shape[0] for b in collect] == [3, 3, 1]
    assert torch.equal(torch.cat(collect), want_train[:7])


def test_held_out_documents_never_reach_training(texts, tok, tmp_path):
    cfg = _cfg(save_texts(tmp_path, texts, "jsonl"), shuffle_buffer=16, eval_fraction=0.2)
    src = TokenSource(cfg, tok)
    train_docs, held_docs = _split_docs(N_DOCS, 0.2, 0)
    assert 10 < len(held_docs) < 40

    it = src.train_batches()
    seen = torch.cat([next(it) for _ in range(200)])  # several epochs, shuffled
    ids = _ids(tok, texts)
    assert _markers(seen) == _markers(_pack([ids[i] for i in train_docs], CTX, 0, 0))
    assert len(_markers(seen)) >= len(train_docs) - 1  # all but one in the dropped tail
    cfg.eval_tokens = 20 * CTX
    assert _markers(torch.cat(TokenSource(cfg, tok).eval_batches())) <= set(held_docs)
    with pytest.warns(UserWarning, match="fewer than the"):
        everything = torch.cat(list(src.collect_batches(10**9)))
    assert _markers(everything) <= set(train_docs)


def test_the_seed_chooses_the_held_out_documents_and_the_order(texts, tok, tmp_path):
    path = save_texts(tmp_path, texts, "jsonl")
    a, b = TokenSource(_cfg(path), tok), TokenSource(_cfg(path), tok)
    ia, ib = a.train_batches(), b.train_batches()
    assert all(torch.equal(next(ia), next(ib)) for _ in range(20))
    assert all(torch.equal(x, y) for x, y in zip(a.eval_batches(), b.eval_batches()))
    c = TokenSource(_cfg(path, seed=1), tok)
    assert not torch.equal(torch.cat(c.eval_batches()), torch.cat(a.eval_batches()))


@pytest.mark.parametrize("tokens_column", [None, "input_ids"])
def test_ranks_together_see_the_global_batch(tokens_column, texts, tok, tmp_path):
    ds = datasets.Dataset.from_dict({"text": texts, "input_ids": _ids(tok, texts)})
    ds.save_to_disk(str(tmp_path / "d"))
    cfg = _cfg(str(tmp_path / "d"), tokens_column=tokens_column, shuffle_buffer=8)
    src = TokenSource(cfg, tok)
    whole = src.train_batches()
    parts = [src.train_batches(rank=r, world_size=2) for r in range(2)]
    for _ in range(10):
        assert torch.equal(next(whole), torch.cat([next(p) for p in parts]))
    with pytest.raises(ValueError, match="divisible"):
        next(TokenSource(_cfg(cfg.path, batch_size=3), tok).train_batches(0, 2))


# ------------------------------------------------------------------ tokenized columns
@pytest.mark.parametrize("fmt", ["parquet", "disk"])
def test_a_tokenized_column_is_cut_into_blocks_as_it_is(fmt, tmp_path):
    rng = np.random.default_rng(0)
    lengths = [CTX] * 5 + list(rng.integers(1, 3 * CTX, 60))  # equal, shorter, longer rows
    rows = [rng.integers(1, 500, n).tolist() for n in lengths]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "text": ["unused"] * len(rows)})
    if fmt == "parquet":
        ds.to_parquet(str(tmp_path / "t.parquet"))
        path = str(tmp_path / "t.parquet")
    else:
        ds.save_to_disk(str(tmp_path / "t"))
        path = str(tmp_path / "t")
    cfg = _cfg(path, tokens_column="input_ids", shuffle_buffer=0, eval_tokens=2 * CTX)
    src = TokenSource(cfg, tokenizer=None)  # no tokenizer needed
    train_rows, held_rows = _split_docs(len(rows), 0.1, 0)
    want = _pack([rows[i] for i in train_rows], CTX, None, None)  # nothing added
    first = [i for i in train_rows if i < 5]  # rows of exactly CTX tokens come back as blocks
    assert all(torch.equal(want[j], torch.tensor(rows[i])) for j, i in enumerate(first))

    it = src.train_batches()
    n = len(want) // BATCH
    assert torch.equal(torch.cat([next(it) for _ in range(n)]), want[: n * BATCH])
    held = _pack([rows[i] for i in held_rows], CTX, None, None)
    assert torch.equal(torch.cat(src.eval_batches()), held[:2])

    cfg.shuffle_buffer = 8  # shuffled: the same blocks, each once per epoch, in another order
    it = TokenSource(cfg).train_batches()
    epoch = torch.cat([next(it) for _ in range(n)])
    assert not torch.equal(epoch, want[: n * BATCH])
    got = sorted(map(tuple, epoch.tolist()))
    assert len(set(got)) == len(got) and set(got) <= set(map(tuple, want.tolist()))


# ------------------------------------------------------------------ held-out sources
def test_eval_path_and_eval_split(texts, tok, tmp_path):
    train = save_texts(tmp_path / "train", texts[:80], "jsonl")
    held = save_texts(tmp_path / "held", texts[80:], "jsonl")
    src = TokenSource(_cfg(train, eval_path=held, eval_tokens=8 * CTX), tok)
    assert _markers(torch.cat(src.eval_batches())) <= set(range(80, N_DOCS))
    it = src.train_batches()
    assert len(_markers(torch.cat([next(it) for _ in range(60)])) & set(range(80))) >= 79
    assert not _markers(torch.cat([next(it) for _ in range(60)])) - set(range(80))

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": texts[:80]}),
        validation=datasets.Dataset.from_dict({"text": texts[80:]}),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    src = TokenSource(_cfg(str(tmp_path / "dd"), eval_split="validation"), tok)
    assert _markers(torch.cat(src.eval_batches())) <= set(range(80, N_DOCS))
    with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['train', 'valid"):
        TokenSource(_cfg(str(tmp_path / "dd"), eval_split="test"), tok)
    with pytest.raises(ValueError, match="one split, 'train'.*eval_path"):
        TokenSource(_cfg(train, eval_split="validation"), tok)


def test_find_data_kinds(tmp_path, texts):
    assert find_data("roneneldan/TinyStories") == ("hub", ["roneneldan/TinyStories"])
    assert find_data(save_texts(tmp_path / "a", texts, "disk"))[0] == "disk"
    assert find_data(save_texts(tmp_path / "b", texts, "txt_dir")) == (
        "text",
        [str(tmp_path / "b" / f"part-{i}.txt") for i in range(3)],
    )
    assert find_data(save_texts(tmp_path / "c", texts, "glob"))[0] == "json"


# ------------------------------------------------------------------ errors
def test_missing_columns_name_the_columns_and_the_fix(texts, tok, tmp_path):
    path = save_texts(tmp_path / "a", texts, "jsonl", column="body")
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['body'\]"):
        TokenSource(_cfg(path), tok)
    TokenSource(_cfg(path, text_column="body"), tok)  # the fix works
    ds = datasets.Dataset.from_dict({"input_ids": _ids(tok, texts)})
    ds.to_json(str(tmp_path / "t.jsonl"))
    with pytest.raises(ValueError, match="tokens_column='input_ids'"):
        TokenSource(_cfg(str(tmp_path / "t.jsonl")), tok)
    with pytest.raises(ValueError, match="holds text, not token ids"):
        TokenSource(_cfg(path, tokens_column="body")).eval_batches()
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        TokenSource(_cfg(path, text_column="body"))


def test_too_little_data_is_an_error_not_a_hang(texts, tok, tmp_path):
    path = save_texts(tmp_path / "a", texts[:3], "jsonl")
    src = TokenSource(_cfg(path, batch_size=64, eval_fraction=0.5), tok)
    with pytest.raises(ValueError, match=r"give \d+ sequence\(s\) of 16 tokens, fewer than one"):
        src.train_batches()
    with pytest.raises(ValueError, match="fewer than eval_tokens=64"):
        src.eval_batches()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="check that the files are not empty"):
        TokenSource(_cfg(str(tmp_path / "empty.txt")), tok)
    (tmp_path / "blank.txt").write_text("\n\n\n")  # rows, but no text
    with pytest.raises(ValueError, match="give 0 sequence"):
        TokenSource(_cfg(str(tmp_path / "blank.txt")), tok).train_batches()
    big = save_texts(tmp_path / "b", texts, "jsonl")
    with pytest.warns(UserWarning, match="fewer than the"):
        got = list(TokenSource(_cfg(big), tok).collect_batches(10**6))
    assert got and sum(len(b) for b in got) < 10**6 // CTX


def test_paths_that_hold_no_data(tmp_path, texts, tok):
    with pytest.raises(FileNotFoundError, match="no files match"):
        TokenSource(_cfg(str(tmp_path / "*.jsonl")), tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no data files in directory"):
        TokenSource(_cfg(str(tmp_path / "empty")), tok)
    for missing in ("./no/such.jsonl", str(tmp_path / "nothing"), "a/b/c"):
        with pytest.raises(FileNotFoundError, match="never looked up on the Hugging Face Hub"):
            TokenSource(_cfg(missing), tok)
    save_texts(tmp_path / "mixed", texts, "jsonl")
    save_texts(tmp_path / "mixed", texts, "parquet")
    with pytest.raises(ValueError, match=r"mixes data files of kinds \['json', 'parquet'\]"):
        TokenSource(_cfg(str(tmp_path / "mixed")), tok)
    (tmp_path / "x.docx").write_text("x")
    with pytest.raises(ValueError, match="not a data file"):
        TokenSource(_cfg(str(tmp_path / "x.docx")), tok)


def test_check_context_refuses_a_context_longer_than_the_model(tok, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_model(backend, n_ctx=16, d_vocab=len(tok))  # no tokenizer
    check_context(_cfg("x.jsonl", context_len=16, tokens_column="input_ids"), model)
    with pytest.raises(ValueError, match="no tokenizer"):
        check_context(_cfg("x.jsonl", context_len=16), model)
    model.tokenizer = tok
    check_context(_cfg("x.jsonl", context_len=16), model)
    with pytest.raises(ValueError, match=r"context_len=17 is longer .*n_ctx=16.*at most 16"):
        check_context(_cfg("x.jsonl", context_len=17), model)


@pytest.mark.usefixtures("user_view")
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(path=" "), "path is empty"),
        (dict(context_len=1), "context_len must be >= 2"),
        (dict(eval_fraction=0.0), r"eval_fraction must be > 0, got 0.0 \(the range is \(0, 1\)\)"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(eval_split="train"), "is the training split"),
        (dict(sample_by="sentence"), "choose one of"),
        (dict(train_tokens=0), "train_tokens must be >= 1"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**{"path": "x.jsonl", **kw})


def test_config_fields_documented_and_round_trip():
    from codebook_lens.validation import field_docs

    assert all(doc.strip() for doc in field_docs(DataConfig).values())
    cfg = DataConfig(path="d/*.jsonl", tokens_column="input_ids", train_tokens=10**6)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
