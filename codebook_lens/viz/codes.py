"""Views of codes over tokens: where a code fires, which code fires, its top contexts, and
per-head codes next to attention patterns.

Every function takes the codes of ONE sequence, ``codes[b]`` of the cached
``f"{site}.hook_codes"`` tensor: ``[pos, k]`` at a whole-vector site, ``[pos, head, k]`` at a
per-head site (``-1`` marks an empty slot). Lengths are checked, because circuitsvis silently
renders mismatched tokens and values. Each returns a :class:`~codebook_lens.viz.offline.View`
(offline HTML; see :mod:`codebook_lens.viz.offline`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from codebook_lens.viz.offline import View, circuitsvis_view, html_view

__all__ = [
    "code_fires",
    "code_color",
    "code_tokens_view",
    "which_code_view",
    "codes_grid_view",
    "top_contexts_view",
    "contexts_from_windows",
    "attention_with_codes_view",
]


def _check_tokens(tokens_str: Sequence[str], what: str = "tokens_str") -> list[str]:
    if isinstance(tokens_str, str) or not all(isinstance(t, str) for t in tokens_str):
        raise TypeError(f"{what} must be a list of token strings (e.g. model.to_str_tokens(..))")
    return list(tokens_str)


def _as_pos_head_k(codes: Tensor, n_tokens: int, what: str = "codes") -> Tensor:
    """``[pos, k]`` or ``[pos, head, k]`` -> ``[pos, head, k]`` (long), with the length checked."""
    if codes.ndim not in (2, 3):
        raise ValueError(
            f"{what} must be [pos, k] or [pos, head, k] (one sequence: index the batch, e.g. "
            f"codes[0]); got shape {tuple(codes.shape)}"
        )
    if codes.shape[0] != n_tokens:
        raise ValueError(
            f"tokens_str has {n_tokens} tokens but {what} has {codes.shape[0]} positions "
            f"(shape {tuple(codes.shape)}); they must be equal"
        )
    codes = codes.long()
    return codes.unsqueeze(1) if codes.ndim == 2 else codes


def _head_index(head: int | None, n_heads: int) -> int | None:
    if head is None:
        return None
    if not -n_heads <= head < n_heads:
        raise IndexError(f"head {head} out of range for codes with {n_heads} head(s)")
    return head % n_heads


def code_fires(
    codes: Int[Tensor, "pos *head k"], code: int, head: int | None = None
) -> Float[Tensor, " pos"]:
    """Per position, at how many heads ``code`` is among the active codes (0/1 for one head).

    ``codes`` is ``[pos, k]`` or ``[pos, head, k]``; ``head`` restricts the count to one head.
    A code repeated in several slots of one head counts once.
    """
    c = _as_pos_head_k(codes, codes.shape[0] if codes.ndim else 0)
    return _fires(c, [int(code)], _head_index(head, c.shape[1]))[:, 0]


def code_color(code: int, lightness: int = 80) -> str:
    """A CSS colour for a code id: golden-angle hues, so neighbouring ids look different.

    ``-1`` (no code) is light grey.
    """
    if code < 0:
        return "hsl(0, 0%, 93%)"
    return f"hsl({(code * 137.508) % 360:.1f}, 70%, {lightness}%)"


def _caption(text: str) -> View:
    return html_view(f'<p class="cl-caption">{html.escape(text)}</p>')


def code_tokens_view(
    tokens_str: Sequence[str],
    codes: Int[Tensor, "pos *head k"],
    code: int | Sequence[int],
    head: int | None = None,
    caption: str | None = None,
) -> View:
    """Tokens coloured by whether ``code`` fires there (circuitsvis ``ColoredTokens``).

    With a per-head ``codes`` ``[pos, head, k]`` and ``head=None`` the colour counts the heads
    that hold the code (hover shows the count). With a list of codes, the view is circuitsvis
    ``ColoredTokensMulti``: one button per code selects which one colours the tokens.
    """
    tokens = _check_tokens(tokens_str)
    c = _as_pos_head_k(codes, len(tokens))
    h = _head_index(head, c.shape[1])
    many = not isinstance(code, int)
    code_list = [int(x) for x in code] if many else [int(code)]  # type: ignore[union-attr]
    if not code_list:
        raise ValueError("code_tokens_view: give at least one code")
    where = f" at head {h}" if h is not None else (" (any head)" if c.shape[1] > 1 else "")
    fires = _fires(c, code_list, h)
    if caption is None:
        hits = ", ".join(f"code {x}: {n}" for x, n in zip(code_list, (fires > 0).sum(0).tolist()))
        caption = f"Positions where the code fires{where} ({hits} of {len(tokens)} tokens)"
    return _caption(caption) + _fires_view(tokens, c, code_list, h, many)


def _fires(c: Tensor, code_list: list[int], h: int | None) -> Tensor:
    """``[pos, n]``: per position and code, the number of heads (or 0/1 at ``h``) holding it."""
    if h is not None:
        c = c[:, h : h + 1]
    ids = torch.tensor(code_list, dtype=torch.long, device=c.device)
    return (c.unsqueeze(-1) == ids).any(-2).sum(1).float()


def _fires_view(
    tokens: list[str], c: Tensor, code_list: list[int], h: int | None, many: bool
) -> View:
    fires = _fires(c, code_list, h)
    if not many:
        top = 1.0 if h is not None else float(c.shape[1])
        return circuitsvis_view(
            "ColoredTokens", tokens=tokens, values=fires[:, 0], minValue=0.0, maxValue=top
        )
    return circuitsvis_view(
        "ColoredTokensMulti", tokens=tokens, values=fires, labels=[f"code {x}" for x in code_list]
    )


def which_code_view(
    tokens_str: Sequence[str],
    codes: Int[Tensor, "pos *head k"],
    head: int | None = None,
    max_codes: int = 12,
    caption: str | None = None,
) -> View:
    """Which code fires at each token: a colour-per-code table (every head and slot) above an
    interactive circuitsvis ``ColoredTokensMulti`` with one button per code.

    The table (:func:`codes_grid_view`) shows code ids in cells coloured by id. The buttons
    cover the ``max_codes`` most frequent codes (at ``head``, or all heads); a button colours
    the tokens where its code fires, and hovering a token lists which of them fire there.
    """
    tokens = _check_tokens(tokens_str)
    c = _as_pos_head_k(codes, len(tokens))
    h = _head_index(head, c.shape[1])
    sel = c if h is None else c[:, h : h + 1]
    flat = sel[sel >= 0]
    if flat.numel() == 0:
        raise ValueError("which_code_view: no code fires (all slots are -1)")
    if max_codes < 1:
        raise ValueError(f"max_codes must be >= 1, got {max_codes}")
    ids, counts = torch.unique(flat, return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)[:max_codes]
    top = ids[order].tolist()
    grid = codes_grid_view(tokens, c if h is None else c[:, h : h + 1], caption=caption)
    multi = _fires_view(tokens, c, top, h, many=True)
    n_more = ids.numel() - len(top)
    more = f" ({n_more} rarer codes not shown)" if n_more > 0 else ""
    note = _caption(f"Most frequent codes{more}: click one to colour the tokens where it fires")
    return grid + note + multi


def codes_grid_view(
    tokens_str: Sequence[str],
    codes: Int[Tensor, "pos *head k"],
    head_labels: Sequence[str] | None = None,
    caption: str | None = None,
) -> View:
    """A static table (no JavaScript): tokens across, one row per head and slot, each cell the
    code id on a colour chosen by id (:func:`code_color`); hover a cell for its position."""
    tokens = _check_tokens(tokens_str)
    c = _as_pos_head_k(codes, len(tokens))
    P, H, K = c.shape
    if head_labels is None:
        head_labels = [f"H{i}" for i in range(H)] if H > 1 else ["codes"]
    if len(head_labels) != H:
        raise ValueError(f"head_labels has {len(head_labels)} names but codes has {H} head(s)")
    head_row = "".join(f"<th><code>{html.escape(t)}</code></th>" for t in tokens)
    rows = [f"<tr><th></th>{head_row}</tr>"]
    vals = c.tolist()
    for hi in range(H):
        for s in range(K):
            label = html.escape(head_labels[hi] + (f" s{s}" if K > 1 else ""))
            cells = "".join(
                f'<td style="background:{code_color(x)}" title="'
                + html.escape(f"pos {p} {tokens[p]!r}, {head_labels[hi]}: code {x}")
                + f'">{"" if x < 0 else x}</td>'
                for p, x in ((p, vals[p][hi][s]) for p in range(P))
            )
            rows.append(f"<tr><th>{label}</th>{cells}</tr>")
    table = '<div class="cl-grid-wrap"><table class="cl-grid">' + "".join(rows) + "</table></div>"
    view = html_view(table)
    return (_caption(caption) + view) if caption else view


def contexts_from_windows(
    context: Int[Tensor, "n window"], before: int, vocab: Sequence[str]
) -> tuple[list[list[str]], list[list[float]]]:
    """Token strings and values for :func:`top_contexts_view` from windows of token ids.

    ``context`` holds one window per example with the firing token at column ``before`` and -1
    beyond the sequence (as ``codebook_lens.analysis.top_examples`` returns them); ``vocab[i]``
    is the text of token ``i``. The firing token gets value 1, the others 0.
    """
    if not 0 <= before < context.shape[1]:
        raise ValueError(f"before={before} is outside windows of {context.shape[1]} tokens")
    toks: list[list[str]] = []
    vals: list[list[float]] = []
    for row in context.tolist():
        if row[before] < 0:
            raise ValueError("a window has no token at its firing column (value -1)")
        keep = [j for j, t in enumerate(row) if t >= 0]
        if max(row[j] for j in keep) >= len(vocab):
            raise ValueError(f"token id {max(row)} is outside the vocab of {len(vocab)} strings")
        toks.append([vocab[row[j]] for j in keep])
        vals.append([1.0 if j == before else 0.0 for j in keep])
    return toks, vals


def top_contexts_view(
    contexts: Sequence[Sequence[Sequence[str]]],
    values: Sequence[Sequence[Sequence[float]]],
    labels: Sequence[str],
    site: str = "site",
) -> View:
    """The top activating contexts of several codes (circuitsvis ``TopkSamples``).

    ``contexts[i][j]`` is the token strings of example ``j`` of code ``i`` and ``values[i][j]``
    its values (e.g. 1 where the code fires; see :func:`contexts_from_windows`); ``labels[i]``
    names code ``i`` (e.g. ``"code 17 (H2)"``). A drop-down picks the code. Every example
    must have as many values as tokens.
    """
    n = len(labels)
    if n == 0:
        raise ValueError("top_contexts_view: give at least one code (labels is empty)")
    if len(contexts) != n or len(values) != n:
        raise ValueError(
            f"contexts ({len(contexts)}), values ({len(values)}) and labels ({n}) must have one "
            "entry per code"
        )
    for i in range(n):
        if len(contexts[i]) != len(values[i]):
            raise ValueError(
                f"code {labels[i]!r}: {len(contexts[i])} contexts but {len(values[i])} value lists"
            )
        if len(contexts[i]) == 0:
            raise ValueError(f"code {labels[i]!r} has no examples")
        for j, (t, v) in enumerate(zip(contexts[i], values[i])):
            _check_tokens(t, f"contexts[{i}][{j}]")
            if len(t) != len(v):
                raise ValueError(
                    f"code {labels[i]!r}, example {j}: {len(t)} tokens but {len(v)} values; "
                    "they must be equal"
                )
    return circuitsvis_view(
        "TopkSamples",
        tokens=[[[list(t) for t in ex] for ex in contexts]],
        activations=[[[[float(x) for x in v] for v in ex] for ex in values]],
        zerothDimensionName="Site",
        firstDimensionName="Code",
        zerothDimensionLabels=[site],
        firstDimensionLabels=list(labels),
    )


def attention_with_codes_view(
    pattern: Float[Tensor, "n_heads dest src"],
    codes: Int[Tensor, "pos head k"],
    tokens_str: Sequence[str],
    head_labels: Sequence[str] | None = None,
    caption: str | None = None,
) -> View:
    """Attention patterns (circuitsvis ``AttentionHeads``) next to each head's codes.

    ``pattern`` is one sequence's ``blocks.L.attn.hook_pattern`` (``cache[..][0]``), ``codes``
    the per-head codes at the same layer (``blocks.L.attn.hook_z.hook_codes``, ``[0]``).
    Heads, positions and tokens must agree.
    """
    tokens = _check_tokens(tokens_str)
    n = len(tokens)
    if pattern.ndim != 3 or pattern.shape[1] != n or pattern.shape[2] != n:
        raise ValueError(
            f"pattern must be [head, q, k] with q = k = len(tokens_str) = {n}; got shape "
            f"{tuple(pattern.shape)}"
        )
    if codes.ndim != 3:
        raise ValueError(f"codes must be per-head [pos, head, k]; got shape {tuple(codes.shape)}")
    c = _as_pos_head_k(codes, n)
    if c.shape[1] != pattern.shape[0]:
        raise ValueError(
            f"pattern has {pattern.shape[0]} heads but codes has {c.shape[1]}; they must be equal"
        )
    H = pattern.shape[0]
    if head_labels is None:
        head_labels = [f"H{i}" for i in range(H)]
    if len(head_labels) != H:
        raise ValueError(f"head_labels has {len(head_labels)} names but there are {H} heads")
    att = circuitsvis_view(
        "AttentionHeads",
        attention=pattern.detach().float(),
        tokens=tokens,
        attentionHeadNames=list(head_labels),
        maskUpperTri=True,
    )
    grid = codes_grid_view(tokens, c, head_labels=head_labels)
    top = _caption(caption) if caption else View(())
    return top + att + _caption("Codes per head (rows) at each token (columns)") + grid
