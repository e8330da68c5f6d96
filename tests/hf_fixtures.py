"""Tiny Hugging Face models, tokenizers and datasets built offline in a temporary directory.

Everything here is made by the real libraries from a config: ``transformers`` builds GPT-2,
GPT-NeoX and Llama models with random weights, ``tokenizers`` trains the tokenizers, and
``datasets`` writes the data files, so tests exercise the same loaders users do and nothing is
downloaded. Typical use::

    model_dir = save_hf_model(tmp_path / "gpt2", "gpt2")        # config.json, weights, tokenizer
    texts = marked_texts(50)                                    # "doc7 w3 w1 ..." documents
    data = save_texts(tmp_path / "data", texts, "parquet")      # the path to give DataConfig

Builders are deterministic (fixed seeds), so two calls give equal models and files.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ARCHS",
    "FORMATS",
    "SPECIAL",
    "bpe_tokenizer",
    "hf_config",
    "marked_texts",
    "save_hf_model",
    "save_texts",
    "word_tokenizer",
    "doc_ids",
]

ARCHS = ("gpt2", "neox", "llama")
"""Architectures :func:`save_hf_model` builds: learned positions + LayerNorm (GPT-2), partial
rotary + parallel attention/MLP (GPT-NeoX), RMSNorm + gated MLP + grouped-query attention
(Llama)."""

FORMATS = ("txt", "txt_dir", "jsonl", "json", "parquet", "arrow", "disk", "disk_dict", "glob")
"""Dataset layouts :func:`save_texts` writes (see there)."""

SPECIAL = "<|endoftext|>"
"""The special token of the tokenizers here: BOS, EOS and padding (id 0)."""

_CLASSES = {"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}


def bpe_tokenizer(vocab_size: int = 300, n_docs: int = 20) -> Any:
    """A byte-level BPE tokenizer trained with ``tokenizers`` on the first ``n_docs`` Python
    documentation topics (a ``PreTrainedTokenizerFast``; :data:`SPECIAL` is BOS/EOS, id 0)."""
    from codebook_lens.data import pydoc_texts
    from codebook_lens.lm.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(pydoc_texts()[:n_docs], vocab_size=vocab_size)


def word_tokenizer(words: Sequence[str]) -> Any:
    """A whitespace word-level tokenizer over :data:`SPECIAL` (id 0) and ``words`` (ids 1, 2,
    ...), so that a word such as a document marker is exactly one token. To give it to a
    transformer-lens model, ``save_pretrained`` it and load it from that directory: an
    in-memory tokenizer is looked up online by its name when the model is built."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {SPECIAL: 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=SPECIAL))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL,
        name_or_path="word-level",  # transformer-lens reads it; a bare in-memory one has none
    )  # fmt: skip


def hf_config(arch: str, vocab_size: int, n_ctx: int = 64, bos_id: int = 0) -> Any:
    """A tiny ``transformers`` config of ``arch`` (:data:`ARCHS`): 2 layers, d_model 32, 4
    heads, context ``n_ctx``, BOS/EOS ``bos_id``."""
    import transformers

    common = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=bos_id)
    if arch == "gpt2":
        # n_ctx as in the Hub's GPT-2 configs (transformer-lens 3.x reads it)
        return transformers.GPT2Config(
            n_positions=n_ctx, n_ctx=n_ctx, n_embd=32, n_layer=2, n_head=4, **common
        )
    if arch == "neox":  # rotary on a quarter of each head, parallel attention + MLP
        return transformers.GPTNeoXConfig(
            max_position_embeddings=n_ctx, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, rotary_pct=0.25,
            use_parallel_residual=True, **common,
        )  # fmt: skip
    if arch == "llama":  # RMSNorm, gated MLP, grouped-query attention
        return transformers.LlamaConfig(
            max_position_embeddings=n_ctx, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, **common,
        )  # fmt: skip
    raise ValueError(f"arch={arch!r}; choose one of {ARCHS}")


def save_hf_model(
    directory: str | Path,
    arch: str = "gpt2",
    tokenizer: Any = None,
    n_ctx: int = 64,
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """Build a tiny random ``arch`` causal LM with ``transformers`` and ``save_pretrained`` it,
    with its tokenizer (default :func:`bpe_tokenizer`), into ``directory``; return the path.
    ``with_tokenizer=False`` leaves the tokenizer out (a directory that cannot be booted)."""
    import transformers

    directory = Path(directory)
    tokenizer = tokenizer if tokenizer is not None else bpe_tokenizer()
    cfg = hf_config(arch, len(tokenizer), n_ctx, bos_id=tokenizer.bos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, _CLASSES[arch])(cfg)
    model.save_pretrained(directory)
    if with_tokenizer:
        tokenizer.save_pretrained(directory)
    return directory


def marked_texts(n: int, words: int = 12, vocab: int = 20, seed: int = 0) -> list[str]:
    """``n`` documents ``"doc{i} w.. w.."``: a unique marker word, then ``words`` to ``3 *
    words`` random words ``w0..w{vocab-1}``; the vocabulary for :func:`word_tokenizer` is
    ``[f"doc{i}" for i in range(n)] + [f"w{j}" for j in range(vocab)]``."""
    rng = random.Random(seed)
    return [
        " ".join(
            [f"doc{i}"] + [f"w{rng.randrange(vocab)}" for _ in range(rng.randint(words, 3 * words))]
        )
        for i in range(n)
    ]


def doc_ids(text: str) -> set[int]:
    """The document numbers of the ``doc{i}`` markers in ``text`` (decoded tokens)."""
    return {int(m) for m in re.findall(r"\bdoc(\d+)\b", text)}


def save_texts(directory: str | Path, texts: Sequence[str], fmt: str, column: str = "text") -> str:
    """Write ``texts`` (one document each, in order) as dataset ``fmt``; return what to pass as
    ``DataConfig.path``:

    ``txt``: one ``.txt`` file, a document per line (texts must be single lines); ``txt_dir``: a
    directory of ``.txt`` files (documents split over three, in sorted order); ``jsonl`` / ``json``:
    JSON lines (``Dataset.to_json``); ``parquet``; ``arrow``: the ``.arrow`` file of
    ``save_to_disk``; ``disk``: a ``Dataset.save_to_disk`` directory; ``disk_dict``: a
    ``DatasetDict`` (split ``train``) saved to disk; ``glob``: ``part-*.jsonl`` over two files.
    ``column`` names the text column (``txt`` formats always use ``text``).
    """
    import datasets

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    texts = list(texts)
    ds = datasets.Dataset.from_dict({column: texts})
    if fmt in ("txt", "txt_dir"):
        if any("\n" in t for t in texts):
            raise ValueError("txt formats hold one document per line; texts must not hold \\n")
        # consecutive thirds, so that the files in sorted order give the original order back
        cuts = [0, len(texts) // 3, 2 * len(texts) // 3, len(texts)]
        parts = [texts] if fmt == "txt" else [texts[a:b] for a, b in zip(cuts, cuts[1:])]
        for i, part in enumerate(parts):
            (d / f"part-{i}.txt").write_text("".join(t + "\n" for t in part), encoding="utf-8")
        return str(d / "part-0.txt") if fmt == "txt" else str(d)
    if fmt in ("jsonl", "json", "parquet"):
        f = d / f"data.{fmt}"
        getattr(ds, "to_parquet" if fmt == "parquet" else "to_json")(str(f))
        return str(f)
    if fmt == "glob":
        half = len(texts) // 2
        for i, part in enumerate((texts[:half], texts[half:])):
            datasets.Dataset.from_dict({column: part}).to_json(str(d / f"part-{i}.jsonl"))
        return str(d / "part-*.jsonl")
    if fmt in ("disk", "arrow"):
        ds.save_to_disk(str(d / "saved"))
        if fmt == "disk":
            return str(d / "saved")
        (arrow,) = sorted((d / "saved").glob("*.arrow"))
        return str(arrow)
    if fmt == "disk_dict":
        datasets.DatasetDict({"train": ds}).save_to_disk(str(d / "saved_dict"))
        return str(d / "saved_dict")
    raise ValueError(f"fmt={fmt!r}; choose one of {FORMATS}")
