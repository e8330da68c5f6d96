"""Top-k code selection: the ids of the k codes most similar to each activation.

:func:`topk_codes` scores activations against a (grouped) codebook one tile of tokens x codes at
a time, each tile one batched GEMM reduced right away, with a running top-k across code chunks;
the ``tokens x n_codes`` score matrix never exists whole and nothing is kept for backward. A
:class:`Workspace` keeps the tile's memory between calls. The tile geometry and the block-max
reduction are explained in docs/performance.md.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["Workspace", "topk_codes"]


# Tile geometry, tuned on a 2-core AVX-512 Xeon (docs/performance.md). A score tile is computed by
# one batched GEMM and reduced right after. GEMM efficiency wants many tokens per call (MKL packs
# operands on every call); few large tiles also mean few parallel regions, which matters when
# the cores are shared. chunk_mb caps every tile.
_TILE_BYTES = 16 * 2**20  # k=1 tiles, per group: codes x tokens
_ROWS = 1024  # tokens per k=1 tile
_TILE_BYTES_K = 64 * 2**20  # k>1 tiles, all groups: tokens x codes, whole codebook if it fits
_MIN_ROWS_K = 64  # fewer tokens than this per k>1 tile: split the codebook instead
# k=1 uses channels-last max pooling, a vectorized max-with-index (torch's max/argmax/topk over
# a dim are scalar loops, much slower than amax); pooling blocks of _POOL codes first keeps both
# cores busy. k>1 narrows candidates with one vectorized block-max pass (blocks of _BLOCK codes)
# and a top-k over the block maxima before an exact top-k over the k best blocks' scores.
_POOL = 128
_BLOCK = 128
_INF = float("inf")


class Workspace:
    """Memory for :func:`topk_codes`'s score tile, kept from one call to the next.

    On the CPU a fresh tile is paid for again on every call: the kernel maps new pages and zeroes
    them on first touch, which at the default 64 MiB tile costs about as much as a third of the
    tile's GEMM (docs/performance.md). A workspace keeps the largest tile asked for so far (at most
    ``chunk_mb``) and hands it out again. On other devices nothing is kept: their caching
    allocators already reuse memory. Calls that overlap (another thread) get a fresh tile instead
    of waiting. Copies (``copy.deepcopy``, pickling) start empty.
    """

    def __init__(self) -> None:
        self._bytes: Tensor | None = None
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace()

    def __reduce__(self) -> tuple:
        return (Workspace, ())

    @property
    def nbytes(self) -> int:
        """Bytes held now (0 until a CPU call needed a tile)."""
        return 0 if self._bytes is None else self._bytes.numel()

    def clear(self) -> None:
        """Let go of the kept memory (the next call allocates again)."""
        self._bytes = None

    @contextmanager
    def tile(self, n: int, dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
        """A flat tensor of ``n`` elements, uninitialised, for the duration of the block."""
        if device.type != "cpu" or not self._lock.acquire(blocking=False):
            yield torch.empty(n, dtype=dtype, device=device)
            return
        try:
            size = n * torch.empty((), dtype=dtype).element_size()
            if self._bytes is None or self._bytes.numel() < size:
                self._bytes = None  # free the old tile before taking the new one
                self._bytes = torch.empty(size, dtype=torch.uint8)
            yield self._bytes[:size].view(dtype)
        finally:
            self._lock.release()


def _prepare_codebook(codebook: Tensor, similarity: str) -> tuple[Tensor, Tensor | None]:
    """Codes as compared (unit-norm for cosine) and an additive score bias (euclidean).

    Done once per call, never per chunk. Activations are not normalised: a positive per-row scale
    does not change a row's ranking.
    """
    if similarity == "cosine":
        return F.normalize(codebook, dim=-1), None
    if similarity == "euclidean":
        # argmin |x-c|^2 == argmax x.c - |c|^2/2 (|x|^2 is constant per row)
        return codebook, -0.5 * codebook.pow(2).sum(-1)
    return codebook, None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _budget(chunk_mb: float, tile_bytes: int, n_groups: int, elem: int) -> int:
    """Score elements per group in one tile."""
    return max(1, min(int(chunk_mb * 2**20), tile_bytes) // elem // n_groups)


def _merge(bv: Tensor, bi: Tensor, v: Tensor, i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Running top-k along the last axis; (v, i) are later codes, so earlier ones win ties."""
    if k == 1:
        take = v > bv
        return torch.where(take, v, bv), torch.where(take, i, bi)
    v, i = torch.cat([bv, v], dim=-1), torch.cat([bi, i], dim=-1)
    v, sel = v.topk(min(k, v.shape[-1]), dim=-1)
    return v, i.gather(-1, sel)


def _pool_max(s: Tensor) -> tuple[Tensor, Tensor]:
    """Max and first arg-max over codes of a contiguous tile ``[G, codes, tokens]`` -> [G, t]."""
    g, c, r = s.shape
    img = s.view(g, c, 1, r).permute(0, 3, 1, 2)  # channels-last: tokens are the channels
    if c < 2 * _POOL or g >= torch.get_num_threads():  # pooling runs in parallel over G * blocks
        m, i = F.max_pool2d(img, (c, 1), return_indices=True)
        return m.view(g, r), i.view(g, r)
    m1, i1 = F.max_pool2d(img, (_POOL, 1), ceil_mode=True, return_indices=True)
    m, j = F.max_pool2d(m1, (m1.shape[2], 1), return_indices=True)  # best block
    return m.view(g, r), i1.flatten(2).gather(2, j.flatten(2)).view(g, r)


def _geometry_top1(n_tok: int, n_codes: int, per_group: int) -> tuple[int, int]:
    """(tokens, codes) of a k=1 tile holding at most ``per_group`` scores per group."""
    width = max(1, min(n_codes, per_group // max(1, min(n_tok, _ROWS))))
    return max(1, min(n_tok, per_group // width)), width


def _geometry_topk(n_tok: int, n_codes: int, k: int, per_group: int) -> tuple[int, int, int, bool]:
    """(tokens, codes, padded row length, blocked) of a k>1 tile of <= ``per_group`` scores per
    group: the whole codebook if that leaves enough tokens, else chunks of whole blocks."""
    blocked = n_codes >= 4 * k * _BLOCK
    width = padded = _round_up(n_codes, _BLOCK) if blocked else n_codes
    if per_group // padded < min(n_tok, _MIN_ROWS_K):
        width = max(1, per_group // max(1, min(n_tok, _MIN_ROWS_K)))
        blocked = width >= 4 * k * _BLOCK
        width = padded = width - width % _BLOCK if blocked else width
    return max(1, min(n_tok, per_group // padded)), min(width, n_codes), padded, blocked


def _top1(
    xs: Tensor, codes: Tensor, bias: Tensor | None, buf: Tensor, rows: int, width: int
) -> Tensor:
    """Best code per token for ``xs`` [G, d, T] -> [G, T], in tiles of ``width`` codes x ``rows``
    tokens held by ``buf`` (flat, at least G * rows * width elements)."""
    n_groups, _, n_tok = xs.shape
    n_codes = codes.shape[1]
    out = torch.empty(n_groups, n_tok, dtype=torch.long, device=xs.device)
    for t0 in range(0, n_tok, rows):
        xt = xs[:, :, t0 : t0 + rows]
        r = xt.shape[2]
        best: tuple[Tensor, Tensor] | None = None
        for c0 in range(0, n_codes, width):
            c = min(width, n_codes - c0)
            s = buf[: n_groups * c * r].view(n_groups, c, r)
            if bias is None:
                torch.bmm(codes[:, c0 : c0 + c], xt, out=s)
            else:
                torch.baddbmm(bias[:, c0 : c0 + c, None], codes[:, c0 : c0 + c], xt, out=s)
            v, i = _pool_max(s)
            best = (v, i) if best is None else _merge(*best, v, i + c0, 1)
        assert best is not None
        out[:, t0 : t0 + r] = best[1]
    return out


def _two_stage(tile: Tensor, rows: Tensor, first: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of a tile ``[G, r, blocks * _BLOCK]`` (pad scores -inf): the k blocks with
    the largest maxima hold the k largest scores, so one vectorized block-max pass and a top-k
    over the block maxima leave ``k * _BLOCK`` candidates for an exact top-k. ``rows`` views the
    tile buffer as rows of one block; ``first`` [G, r, 1] is each token's first row there."""
    g, r = tile.shape[:2]
    blk = tile.unflatten(-1, (-1, _BLOCK)).amax(-1).topk(k, dim=-1).indices  # [G, r, k]
    cand = rows.index_select(0, (blk + first).view(-1)).view(g, r, k * _BLOCK)
    v, j = cand.topk(k, dim=-1)
    return v, blk.gather(-1, j // _BLOCK) * _BLOCK + j % _BLOCK


def _topk_rows(
    xg: Tensor, codes_t: Tensor, bias: Tensor | None, k: int, flat: Tensor, geometry: tuple
) -> Tensor:
    """Top-k codes per token for ``xg`` [G, T, d] -> [G, T, k], in tiles of tokens x codes
    (``geometry`` from :func:`_geometry_topk`) held by ``flat`` (at least G * rows * padded)."""
    n_groups, n_tok, _ = xg.shape
    n_codes = codes_t.shape[2]
    rows, width, padded, blocked = geometry
    buf = flat[: n_groups * rows * padded].view(n_groups, rows, padded)
    # pad columns hold -inf so that whole blocks can be reduced (only they: the GEMM writes the
    # rest, and a full fill would touch the whole tile once more)
    buf[:, :, width:] = -_INF
    buf_rows = buf.view(-1, _BLOCK) if blocked else buf
    first = torch.arange(n_groups * rows, device=xg.device).view(n_groups, rows, 1)
    first = first * (padded // _BLOCK)
    out = torch.empty(n_groups, n_tok, k, dtype=torch.long, device=xg.device)
    for t0 in range(0, n_tok, rows):
        xt = xg[:, t0 : t0 + rows]
        r = xt.shape[1]
        best: tuple[Tensor, Tensor] | None = None
        for c0 in range(0, n_codes, width):
            c = min(width, n_codes - c0)
            s, ct = buf[:, :r, :c], codes_t[:, :, c0 : c0 + c]
            if bias is None:
                torch.bmm(xt, ct, out=s)
            else:
                torch.baddbmm(bias[:, None, c0 : c0 + c], xt, ct, out=s)
            cb = _round_up(c, _BLOCK)
            if blocked and cb >= k * _BLOCK:
                if cb != c and n_codes > width:  # an earlier chunk overwrote the pad
                    buf[:, :r, c:cb] = -_INF
                v, i = _two_stage(buf[:, :r, :cb], buf_rows, first[:, :r], k)
            else:
                v, i = s.topk(min(k, c), dim=-1)
            best = (v, i) if best is None else _merge(*best, v, i + c0, k)
        assert best is not None
        out[:, t0 : t0 + r] = best[1]
    return out


def topk_codes(
    x: Float[Tensor, "n_tok n_groups d"],
    codebook: Float[Tensor, "n_groups n_codes d"],
    k: int,
    similarity: Literal["cosine", "dot", "euclidean"] = "cosine",
    chunk_mb: float = 256.0,
    workspace: Workspace | None = None,
) -> Int[Tensor, "n_tok n_groups k"]:
    """Ids of the k most similar codes for each token and group, most similar first.

    Scores are computed one cache-sized tile of tokens x codes at a time, for all groups in one
    batched GEMM, and reduced at once; a running top-k is merged across code chunks. A tile never
    exceeds ``chunk_mb`` MiB, and nothing is kept for backward. The result equals the unchunked
    ``scores.topk(k)`` up to the order of exact ties (k=1 picks the first of tied codes, as
    ``argmax`` does). Scores are computed in ``x``'s dtype (GEMMs accumulate in fp32), except
    float16, which is scored in float32. Rows of ``x`` that are not finite get arbitrary ids;
    :meth:`codebook_lens.quantizer.Codebook.encode` marks them empty (-1).

    ``similarity``: ``"cosine"`` (the default), ``"dot"`` or ``"euclidean"`` (negative
    distance). ``workspace``: where the score tile lives; pass the same :class:`Workspace` to
    repeated calls (a :class:`~codebook_lens.quantizer.Codebook` keeps one) to skip allocating it.
    """
    if x.dtype == torch.float16:  # fp16 scores overflow (max 65504) and fp16 GEMM is slow on CPU
        x = x.float()
    n_tok, n_groups = x.shape[:2]
    n_codes = codebook.shape[1]
    codes, bias = _prepare_codebook(codebook.to(x.dtype), similarity)
    ws = workspace if workspace is not None else Workspace()
    elem = x.element_size()
    if k == 1:
        per_group = _budget(chunk_mb, _TILE_BYTES * n_groups, n_groups, elem)
        rows, width = _geometry_top1(n_tok, n_codes, per_group)
        with ws.tile(n_groups * rows * width, x.dtype, x.device) as buf:
            ids = _top1(x.permute(1, 2, 0), codes, bias, buf, rows, width)  # [G, T]
        return ids.t().unsqueeze(-1)
    per_group = _budget(chunk_mb, _TILE_BYTES_K, n_groups, elem)
    geometry = _geometry_topk(n_tok, n_codes, k, per_group)
    with ws.tile(n_groups * geometry[0] * geometry[2], x.dtype, x.device) as buf:
        ids = _topk_rows(x.transpose(0, 1), codes.transpose(1, 2), bias, k, buf, geometry)
    return ids.transpose(0, 1)
