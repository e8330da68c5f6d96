"""Features as per-position labels: token sets and regexes over decoded text.

A *feature* is a Bool tensor ``[n_seq, pos]`` (True where it holds). Integer labels (one class
id per position, -1 = ignore), such as TokFSM states, are used directly by
:func:`~codebook_lens.analysis.attribution.label_attribution`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from codebook_lens.analysis.store import CodeStore

__all__ = ["token_feature", "regex_feature", "token_strings"]


def _tokens_of(tokens_or_store: CodeStore | Tensor) -> Tensor:
    if isinstance(tokens_or_store, CodeStore):
        return tokens_or_store.require_tokens()
    t = torch.as_tensor(tokens_or_store)
    if t.dim() != 2:
        raise ValueError(f"tokens must be [n_seq, pos], got shape {tuple(t.shape)}")
    return t.long()


def token_feature(
    tokens_or_store: CodeStore | Int[Tensor, "seq pos"],
    token_ids: int | Sequence[int] | Tensor,
) -> Bool[Tensor, "seq pos"]:
    """True where the token is one of ``token_ids``."""
    tokens = _tokens_of(tokens_or_store)
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    return torch.isin(tokens, ids.to(tokens.device))


def token_strings(vocab: Any, ids: Sequence[int]) -> list[str]:
    """The text of each token id in ``ids``, from a list of strings, a tokenizer (with
    ``decode``) or a model with a ``tokenizer``."""
    if isinstance(vocab, (list, tuple)):
        if ids and max(ids) >= len(vocab):
            raise ValueError(f"token id {max(ids)} is outside the vocab list of {len(vocab)}")
        return [vocab[i] for i in ids]
    tok = getattr(vocab, "tokenizer", vocab) if not hasattr(vocab, "decode") else vocab
    if tok is None or not hasattr(tok, "decode"):
        raise ValueError(
            "this model has no tokenizer; pass vocab= as a list of token strings (index = id) "
            "or a tokenizer with .decode"
        )
    return [tok.decode([i]) for i in ids]


def regex_feature(
    tokens_or_store: CodeStore | Int[Tensor, "seq pos"],
    pattern: str | re.Pattern[str],
    vocab: Any,
    mode: Literal["overlap", "start", "end"] = "overlap",
) -> Bool[Tensor, "seq pos"]:
    """True at tokens that a regex match covers in the decoded text of each sequence.

    Each sequence is decoded token by token (its text is the concatenation of the tokens'
    strings, so character spans map exactly to tokens). ``mode`` says which tokens a match
    marks: every token holding one of its characters, the token holding its first character,
    or the token holding its last character. Empty matches (and empty tokens) mark nothing.

    Args:
        tokens_or_store: A CodeStore with tokens, or tokens ``[n_seq, pos]``.
        pattern: A regular expression (``re`` syntax).
        vocab: A list of token strings, a tokenizer, or a model with ``.tokenizer``.
        mode: ``"overlap"`` | ``"start"`` | ``"end"``.
    """
    if mode not in ("overlap", "start", "end"):
        raise ValueError(f"mode={mode!r}; choose 'overlap', 'start' or 'end'")
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    tokens = _tokens_of(tokens_or_store)
    uniq = torch.unique(tokens).tolist()
    strs = token_strings(vocab, uniq)
    table = {u: s for u, s in zip(uniq, strs)}
    lens = np.zeros(max(uniq) + 1 if uniq else 1, dtype=np.int64)
    lens[uniq] = [len(s) for s in strs]
    tok_np = tokens.cpu().numpy()
    n_seq, n_pos = tok_np.shape
    out = np.zeros((n_seq, n_pos + 1), dtype=np.int64)
    nonempty = lens[tok_np] > 0  # an empty token covers no character of a match
    for i in range(n_seq):  # one string per sequence: regexes need text
        row = tok_np[i]
        ends = np.cumsum(lens[row])
        starts = ends - lens[row]
        text = "".join(table[t] for t in row.tolist())
        spans = np.array([m.span() for m in rx.finditer(text) if m.end() > m.start()])
        if spans.size == 0:
            continue
        first = np.searchsorted(ends, spans[:, 0], side="right")  # token holding char start
        last = np.searchsorted(starts, spans[:, 1], side="left") - 1  # token holding end-1
        if mode == "start":
            last = first
        elif mode == "end":
            first = last
        np.add.at(out[i], first, 1)
        np.add.at(out[i], last + 1, -1)
    return torch.from_numpy((np.cumsum(out, axis=1)[:, :n_pos] > 0) & nonempty)
