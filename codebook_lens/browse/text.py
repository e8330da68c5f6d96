"""Decoded text of the stored sequences, and regex / token features over it with limits.

The text of every sequence is built once (token strings concatenated, so character spans map
exactly to tokens, as in :func:`codebook_lens.analysis.regex_feature`). A regex runs with the
``regex`` package's ``timeout`` against one shared deadline, so a catastrophic pattern returns
an error instead of hanging the server; spans are mapped to tokens with one vectorized
``searchsorted`` over global character offsets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import regex
import torch
from jaxtyping import Bool
from torch import Tensor

from codebook_lens.browse.errors import bad_request

__all__ = ["StoreText", "MAX_PATTERN_LEN", "compile_pattern"]

MAX_PATTERN_LEN = 300
"""Longest regex accepted (characters)."""


def compile_pattern(pattern: str) -> regex.Pattern[str]:
    """Compile a user regex, or a 400 naming the problem."""
    if not pattern:
        raise bad_request("empty regex; type a pattern such as ' the' or 'ing\\b'")
    if len(pattern) > MAX_PATTERN_LEN:
        raise bad_request(
            f"regex of {len(pattern)} characters; the limit is {MAX_PATTERN_LEN}, shorten it"
        )
    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise bad_request(f"invalid regex {pattern!r}: {e}") from e


class StoreText:
    """Per-sequence text of a token store and a map from character offsets to tokens."""

    def __init__(self, tokens: Tensor, vocab: Sequence[str]):
        tok = tokens.long().numpy()
        if tok.size and int(tok.max()) >= len(vocab):
            raise ValueError(f"token id {int(tok.max())} has no entry in a vocab of {len(vocab)}")
        self.n_seq, self.n_pos = tok.shape
        self.vocab = list(vocab)
        lens = np.array([len(s) for s in self.vocab], dtype=np.int64)[tok].reshape(-1)
        self.ends = np.cumsum(lens)  # global char end of each flat token
        self.starts = self.ends - lens
        self.nonempty = lens > 0
        row_start = self.starts.reshape(self.n_seq, self.n_pos)[:, 0] if tok.size else lens[:0]
        self.seq_base = row_start  # global char offset of each sequence's text
        table = np.array(self.vocab, dtype=object)
        self.texts = ["".join(r) for r in table[tok].tolist()]
        self.text_ids: dict[str, list[int]] = {}
        for i, s in enumerate(self.vocab):
            self.text_ids.setdefault(s, []).append(i)

    def token_ids(self, text: str) -> list[int]:
        """Ids of the tokens whose text is exactly ``text`` (or ``#<id>``), or a 400."""
        if text.startswith("#") and text[1:].isdigit():
            i = int(text[1:])
            if i < len(self.vocab):
                return [i]
        ids = self.text_ids.get(text)
        if not ids:
            raise bad_request(
                f"no token has the text {text!r}; token texts are exact (mind leading spaces), "
                "or write #<id>"
            )
        return ids

    def regex_feature(
        self, pattern: str, mode: str = "overlap", budget_s: float = 2.0
    ) -> Bool[Tensor, "seq pos"]:
        """True at tokens a match (of capture group 1 if the pattern has one) covers.

        ``mode``: every covered token (``overlap``), the one holding the first character
        (``start``) or the last (``end``). Raises a 400 past ``budget_s`` seconds.
        """
        if mode not in ("overlap", "start", "end"):
            raise bad_request(f"mode={mode!r}; choose overlap, start or end")
        rx = compile_pattern(pattern)
        group = 1 if rx.groups >= 1 else 0
        deadline = time.monotonic() + budget_s
        lo: list[int] = []
        hi: list[int] = []
        for base, text in zip(self.seq_base.tolist(), self.texts):
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                for m in rx.finditer(text, timeout=left):
                    a, b = m.span(group)
                    if b > a:
                        lo.append(base + a)
                        hi.append(base + b)
            except TimeoutError:
                raise bad_request(
                    f"regex {pattern!r} ran past its time budget of {budget_s:g} s; make it "
                    "more specific (avoid nested quantifiers such as (a+)+)"
                ) from None
        return self._mark(np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64), mode)

    def _mark(self, lo: np.ndarray, hi: np.ndarray, mode: str) -> Tensor:
        n = self.n_seq * self.n_pos
        out = np.zeros(n + 1, dtype=np.int64)
        if lo.size:
            first = np.searchsorted(self.ends, lo, side="right")
            last = np.searchsorted(self.starts, hi, side="left") - 1
            if mode == "start":
                last = first
            elif mode == "end":
                first = last
            np.add.at(out, first, 1)
            np.add.at(out, last + 1, -1)
        hit = (np.cumsum(out)[:n] > 0) & self.nonempty
        return torch.from_numpy(hit.reshape(self.n_seq, self.n_pos))
