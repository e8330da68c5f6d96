"""The local BPE tokenizer: round trip on real English, save/load, and TransformerLens use."""

from __future__ import annotations

import warnings

import pytest
import torch

from codebook_lens.atomic import data_path
from codebook_lens.data import BlockStream, encode_texts, hf_texts, pack_blocks, pydoc_texts
from codebook_lens.lm.tokenizer import (
    TOKENIZER_KIND,
    load_tokenizer,
    save_tokenizer,
    train_bpe_tokenizer,
)
from tests.conftest import make_model

ODD = ["", " ", "Ünïcode — ✓ 🐉", "tabs\tand  double  spaces\n\nnew para", "x" * 300]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(pydoc_texts(), vocab_size=600)


def test_round_trip_on_pydoc_and_odd_strings(tok):
    texts = pydoc_texts() + ODD
    ids = encode_texts(tok, texts)
    assert [tok.decode(i) for i in ids] == texts
    assert max(max(i) for i in ids if i) < len(tok) == 600
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 0
    assert sum(map(len, ids)) < 0.5 * sum(map(len, texts))  # BPE actually compresses


def test_save_load_gives_the_same_tokenizer(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert sorted(p.name for p in data_path(tmp_path / "tok", TOKENIZER_KIND).iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    sample = pydoc_texts()[:5] + ODD
    assert encode_texts(again, sample) == encode_texts(tok, sample)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_transformer_lens_accepts_it(tok, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_model(
            backend, tokenizer=tok, n_layers=1, n_heads=2, d_head=16, n_ctx=64, d_vocab=len(tok)
        )
    text = "def f(x):\n    return x  # Ünïcode"
    toks = model.to_tokens(text)
    assert toks[0, 0] == 0 and (toks[0, 1:] != 0).all()  # exactly one BOS
    assert toks[0, 1:].tolist() == encode_texts(tok, [text])[0]
    assert model.to_string(toks[0, 1:]) == text
    assert model.to_tokens(text, prepend_bos=False)[0].tolist() == toks[0, 1:].tolist()
    assert model.to_str_tokens("for x in y")[0] == "<|endoftext|>"
    torch.manual_seed(0)
    out = model.generate("The for", max_new_tokens=5, verbose=False, use_past_kv_cache=False)
    assert isinstance(out, str) and out.startswith("The for")


def test_hf_dataset_streams_through_the_tokenizer(tok):
    datasets = pytest.importorskip("datasets")
    texts = pydoc_texts()[:20]
    ds = datasets.Dataset.from_dict({"text": texts[:10] + [""] + texts[10:]})
    assert list(hf_texts(ds)) == texts  # blank rows are skipped
    with pytest.raises(KeyError, match="no column"):
        list(hf_texts(ds, column="body"))
    stream = BlockStream(lambda: hf_texts(ds), tok, block_len=64, batch_size=8)
    batches = list(stream)
    assert batches and all(b.shape == (8, 64) for b in batches)
    got = torch.cat(batches)
    assert (got[:, 0] == tok.bos_token_id).all()
    want = pack_blocks(encode_texts(tok, texts), 64, tok.bos_token_id, tok.eos_token_id)
    assert torch.equal(got, want[: len(want) // 8 * 8])  # the dataset's text, packed in order
    streaming = ds.to_iterable_dataset()
    assert list(hf_texts(streaming)) == texts
