"""A small byte-level BPE tokenizer trained locally, wrapped so TransformerLens accepts it.

``HookedTransformer(cfg, tokenizer=tok)`` needs a Hugging Face ``PreTrainedTokenizerFast`` with
BOS/EOS/pad tokens; with such a tokenizer ``to_tokens``, ``to_string``, ``to_str_tokens`` and
``generate`` on strings all work, exactly as with a tokenizer from the Hub. Byte-level BPE
decodes every string back to itself. Saving and loading (:func:`save_tokenizer`,
:func:`load_tokenizer`) are :mod:`codebook_lens.tokenizer_files`, which the browser reads with.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from codebook_lens.tokenizer_files import TOKENIZER_KIND, load_tokenizer, save_tokenizer

__all__ = [
    "SPECIAL_TOKEN",
    "train_bpe_tokenizer",
    "wrap_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "TOKENIZER_KIND",
]


SPECIAL_TOKEN = "<|endoftext|>"
"""The one special token (id 0): BOS, EOS and padding, as in GPT-2."""


def wrap_tokenizer(
    tokenizer: Any, special_token: str = SPECIAL_TOKEN, name: str = "local-bpe"
) -> Any:
    """A ``PreTrainedTokenizerFast`` around a ``tokenizers.Tokenizer`` that TransformerLens accepts.

    ``special_token`` becomes BOS, EOS and padding; the tokenizer prepends BOS by itself
    (``add_bos_token=True``) so TransformerLens needs no second copy of it, and ``name`` is
    what TransformerLens sees as ``name_or_path``.
    """
    from transformers import PreTrainedTokenizerFast

    if tokenizer.token_to_id(special_token) is None:
        raise ValueError(
            f"the tokenizer has no {special_token!r} token; train it with that special token "
            "or pass special_token="
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=special_token,
        eos_token=special_token,
        pad_token=special_token,
        add_bos_token=True,
        name_or_path=name,
        clean_up_tokenization_spaces=False,
    )


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    min_frequency: int = 2,
    special_token: str = SPECIAL_TOKEN,
) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it (:func:`wrap_tokenizer`).

    The 256 byte symbols are always in the vocabulary, so any string round-trips; the special
    token has id 0. Deterministic for the same texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(
            f"vocab_size must exceed 257 (256 bytes + the special token), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[special_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return wrap_tokenizer(tok, special_token)
