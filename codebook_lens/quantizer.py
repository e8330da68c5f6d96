"""`Codebook`: a top-k vector-quantization bottleneck with TransformerLens hook points.

``encode`` picks, per position (and per group), the k codes most similar to the activation;
``decode`` combines their vectors; ``forward`` is ``decode(encode(x))`` with a straight-through
gradient to ``x``. Scoring streams over chunks of tokens (and codes) so the ``tokens x n_codes``
score matrix never exists whole, and nothing is kept of it for backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from codebook_lens.config import CodebookConfig

__all__ = ["Codebook", "topk_codes"]


# Tile geometry, tuned on a 2-core AVX-512 Xeon (docs/performance.md). A score tile is computed by
# one batched GEMM and reduced right after. GEMM efficiency wants many tokens per call (MKL packs
# operands on every call); few large tiles also mean few parallel regions, which matters when
# the cores are shared. chunk_mb caps every tile.
_TILE_BYTES = 16 * 2**20  # k=1 tiles, per group: codes x tokens
_ROWS = 1024  # tokens per k=1 tile
_TILE_BYTES_K = 64 * 2**20  # k>1 tiles, all groups: tokens x codes, whole codebook if it fits
_MIN_ROWS_K = 64  # fewer tokens than this per k>1 tile: split the codebook instead
# k=1 uses channels-last max pooling, a vectorized max-with-index (torch's max/argmax/topk over
# a dim are scalar loops, ~10x slower than amax); pooling blocks of _POOL codes first keeps both
# cores busy. k>1 narrows candidates in two vectorized block-max stages (blocks of _BLOCK codes,
# then sub-blocks of _SUB) before an exact top-k over k * _SUB scores.
_POOL = 128
_BLOCK = 128
_SUB = 8
_INF = float("inf")


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


def _top1(xs: Tensor, codes: Tensor, bias: Tensor | None, per_group: int) -> Tensor:
    """Best code per token for ``xs`` [G, d, T] -> [G, T], in tiles of codes x tokens."""
    n_groups, _, n_tok = xs.shape
    n_codes = codes.shape[1]
    rows, width = _geometry_top1(n_tok, n_codes, per_group)
    buf = xs.new_empty(n_groups * width * rows)
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
    """Exact top-k of a tile ``[G, r, blocks * _BLOCK]`` (pad scores -inf). The k blocks with
    the largest maxima hold the k largest scores, and so on down to sub-blocks. ``rows`` views the
    tile buffer as rows of one block; ``first`` [G, r, 1] is each token's first row there."""
    g, r = tile.shape[:2]
    nsub = _BLOCK // _SUB
    blk = tile.unflatten(-1, (-1, _BLOCK)).amax(-1).topk(k, dim=-1).indices  # [G, r, k]
    cand = rows.index_select(0, (blk + first).view(-1)).view(g * r * k * nsub, _SUB)
    sub = cand.view(g, r, k * nsub, _SUB).amax(-1).topk(k, dim=-1).indices  # [G, r, k]
    first2 = torch.arange(0, g * r * k * nsub, k * nsub, device=tile.device).view(g, r, 1)
    v, j = cand.index_select(0, (sub + first2).view(-1)).view(g, r, k * _SUB).topk(k, dim=-1)
    sub = sub.gather(-1, j // _SUB)
    code = blk.gather(-1, sub // nsub) * _BLOCK + (sub % nsub) * _SUB + j % _SUB
    return v, code


def _topk_rows(xg: Tensor, codes_t: Tensor, bias: Tensor | None, k: int, per_group: int) -> Tensor:
    """Top-k codes per token for ``xg`` [G, T, d] -> [G, T, k], in tiles of tokens x codes."""
    n_groups, n_tok, _ = xg.shape
    n_codes = codes_t.shape[2]
    rows, width, padded, blocked = _geometry_topk(n_tok, n_codes, k, per_group)
    # one tile buffer; pad columns hold -inf so that whole blocks can be reduced
    buf = torch.full((n_groups, rows, padded), -_INF, dtype=xg.dtype, device=xg.device)
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
    similarity: str = "cosine",
    chunk_mb: float = 256.0,
) -> Int[Tensor, "n_tok n_groups k"]:
    """Ids of the k most similar codes for each token and group, most similar first.

    Scores are computed one cache-sized tile of tokens x codes at a time, for all groups in one
    batched GEMM, and reduced at once; a running top-k is merged across code chunks. A tile never
    exceeds ``chunk_mb`` MiB, and nothing is kept for backward. The result equals the unchunked
    ``scores.topk(k)`` up to the order of exact ties (k=1 picks the first of tied codes, as
    ``argmax`` does). Scores are computed in ``x``'s dtype (GEMMs accumulate in fp32), except
    float16, which is scored in float32. Rows of ``x`` that are not finite get arbitrary ids;
    :meth:`Codebook.encode` marks them empty (-1).
    """
    if x.dtype == torch.float16:  # fp16 scores overflow (max 65504) and fp16 GEMM is slow on CPU
        x = x.float()
    n_groups = x.shape[1]
    codes, bias = _prepare_codebook(codebook.to(x.dtype), similarity)
    elem = x.element_size()
    if k == 1:
        per_group = _budget(chunk_mb, _TILE_BYTES * n_groups, n_groups, elem)
        ids = _top1(x.permute(1, 2, 0), codes, bias, per_group)  # [G, T]
        return ids.t().unsqueeze(-1)
    per_group = _budget(chunk_mb, _TILE_BYTES_K, n_groups, elem)
    ids = _topk_rows(x.transpose(0, 1), codes.transpose(1, 2), bias, k, per_group)
    return ids.transpose(0, 1)


class Codebook(nn.Module):
    """A (possibly grouped) codebook quantizer.

    The code vectors are one parameter ``codebook`` of shape ``[n_groups, n_codes, d_in]``.
    Ungrouped codebooks take ``[..., d_in]`` and give codes ``[..., k]``; grouped ones take
    ``[..., n_groups, d_in]`` and give ``[..., n_groups, k]``. Code id ``-1`` is an empty slot.

    Hook points: ``hook_codes`` sees the chosen ids; a hook returning modified ids changes what
    ``forward`` emits (that is how patching works). When attached by :class:`CodebookModel` it is
    named ``f"{site}.hook_codes"``.

    dtypes: the parameters keep their own dtype (float32 unless you cast them, e.g. with
    ``cm.to(torch.bfloat16)``) and are cast to the activation's dtype at use, so the output has
    the activation's dtype (bf16/fp16/fp32). Scores are computed in the activation's dtype,
    float16 in float32; the losses are float32.

    Non-finite activations: rows with NaN/inf get empty codes (-1) instead of arbitrary ones, a
    device-side step with no host sync. With ``check_finite`` (the attribute, or the argument of
    :meth:`encode`/:meth:`forward`) they raise ``ValueError`` instead, at the cost of one host
    sync per call; :class:`CodebookModel` turns it on in its analysis entry points.
    """

    def __init__(self, cfg: CodebookConfig):
        super().__init__()
        if not isinstance(cfg, CodebookConfig):
            raise TypeError(f"Codebook expects a CodebookConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        init = torch.randn(cfg.n_groups, cfg.n_codes, cfg.d_in, generator=g)
        normed = cfg.input_norm in ("layernorm", "affine")
        if cfg.similarity == "cosine" or normed:
            scale = math.sqrt(cfg.d_in) if normed else 1.0
            init = F.normalize(init, dim=-1) * scale
        else:
            init = init / math.sqrt(cfg.d_in)
        self.codebook = nn.Parameter(init)
        if cfg.input_norm == "affine":
            self.ln_weight = nn.Parameter(torch.ones(cfg.n_groups, cfg.d_in))
            self.ln_bias = nn.Parameter(torch.zeros(cfg.n_groups, cfg.d_in))
        self.hook_codes = HookPoint()
        self.register_buffer("code_counts", torch.zeros(cfg.n_groups, cfg.n_codes))
        self.register_buffer(
            "window_counts", torch.zeros(cfg.n_groups, cfg.n_codes), persistent=False
        )
        self.last_losses: dict[str, Tensor] = {}
        self.recent: Tensor | None = None
        self.enabled = True
        self.check_finite = False

    # ------------------------------------------------------------------ shapes
    @property
    def grouped(self) -> bool:
        """Whether inputs carry an explicit group axis (``n_groups > 1``)."""
        return self.cfg.n_groups > 1

    @property
    def where(self) -> str:
        """``"codebook at <site>"`` once attached by a CodebookModel, else ``"codebook"``."""
        name = self.hook_codes.name
        return f"codebook at {name.removesuffix('.hook_codes')}" if name else "codebook"

    def _flatten(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        if x.shape[-1] != cfg.d_in:
            raise ValueError(
                f"Codebook expects inputs with last dimension d_in={cfg.d_in}, got shape "
                f"{tuple(x.shape)}; build the config with d_in={x.shape[-1]}"
            )
        if self.grouped:
            if x.dim() < 2 or x.shape[-2] != cfg.n_groups:
                raise ValueError(
                    f"grouped Codebook expects [..., n_groups={cfg.n_groups}, {cfg.d_in}], "
                    f"got shape {tuple(x.shape)}"
                )
            return x.reshape(-1, cfg.n_groups, cfg.d_in)
        return x.reshape(-1, 1, cfg.d_in)

    def normalize_input(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """The activation as the codes see it: unchanged, LayerNorm (``"layernorm"``), or
        LayerNorm with the learned per-group weight and bias (``"affine"``), in ``x``'s dtype."""
        cfg = self.cfg
        if cfg.input_norm == "layernorm":
            return F.layer_norm(x, (cfg.d_in,), eps=cfg.norm_eps)
        if cfg.input_norm == "affine":
            w, b = (
                (self.ln_weight, self.ln_bias)
                if self.grouped
                else (self.ln_weight[0], self.ln_bias[0])
            )
            return F.layer_norm(x, (cfg.d_in,), eps=cfg.norm_eps) * w.to(x.dtype) + b.to(x.dtype)
        return x

    # ------------------------------------------------------------------ checkpoint tensors
    def extra_tensors(self) -> dict[str, Tensor]:
        """Learned tensors other than ``codebook`` that a checkpoint keeps, by name: the affine
        input LayerNorm's ``ln_weight`` and ``ln_bias`` ``[n_groups, d_in]`` (empty otherwise)."""
        if self.cfg.input_norm != "affine":
            return {}
        return {"ln_weight": self.ln_weight, "ln_bias": self.ln_bias}

    def load_extra_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy :meth:`extra_tensors` values in; a missing name, a wrong shape, a non-float
        dtype or a non-finite value raises ``ValueError`` naming the site and the tensor."""
        for name in self.extra_tensors():
            if name not in tensors:
                raise ValueError(
                    f"{self.where}: missing tensor {name!r} for a codebook with input_norm="
                    f"{self.cfg.input_norm!r}"
                )
        self.load_tensors({n: tensors[n] for n in self.extra_tensors()})

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy saved tensors in by name (``"codebook"``, ``"code_counts"`` and the names of
        :meth:`extra_tensors`; absent names are left as they are), after checking all of them:
        a float dtype (``code_counts`` may be an integer), the exact shape, finite values and
        non-negative counts. Raises ``ValueError`` naming the site and the tensor; nothing is
        copied unless every tensor passes."""
        targets = {"codebook": self.codebook, "code_counts": self.code_counts}
        targets.update(self.extra_tensors())
        unknown = sorted(set(tensors) - set(targets))
        if unknown:
            raise ValueError(f"{self.where}: unknown tensor(s) {unknown}; expected {list(targets)}")
        for name, t in tensors.items():
            self._check_tensor(name, t, targets[name])
        with torch.no_grad():
            for name, t in tensors.items():
                targets[name].copy_(t)

    def _check_tensor(self, name: str, t: Tensor, target: Tensor) -> None:
        where = f"{self.where}, tensor {name!r}"
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: expected a tensor, got {type(t).__name__}")
        integer_ok = name == "code_counts" and not (t.is_complex() or t.dtype == torch.bool)
        if not (t.is_floating_point() or integer_ok):
            raise ValueError(
                f"{where} has dtype {t.dtype}; it must be a floating-point tensor (the file is "
                "corrupt or not written by codebook_lens)"
            )
        if tuple(t.shape) != tuple(target.shape):
            raise ValueError(
                f"{self.where}: {name} has shape {tuple(t.shape)}; this codebook needs "
                f"{tuple(target.shape)} (config n_groups={self.cfg.n_groups}, n_codes="
                f"{self.cfg.n_codes}, d_in={self.cfg.d_in})"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{where} holds NaN/inf values; the checkpoint was saved from a diverged run. "
                "Load an earlier checkpoint or retrain with a lower learning rate"
            )
        if name == "code_counts" and t.numel() and bool((t < 0).any()):
            raise ValueError(f"{where} holds negative counts; the checkpoint is corrupt")

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self, x: Float[Tensor, "... d_in"], check_finite: bool | None = None
    ) -> Int[Tensor, "... k"]:
        """Ids of the k most similar codes, most similar in slot 0 (no gradient).

        Positions (and groups) whose activation is not finite get -1 in every slot; with
        ``check_finite`` (default: the ``check_finite`` attribute) they raise ``ValueError``.
        """
        return self._select(self.normalize_input(x), check_finite)

    def _select(self, x_n: Tensor, check_finite: bool | None = None) -> Tensor:
        flat = self._flatten(x_n)
        with torch.no_grad():
            flat = flat.detach()
            ids = topk_codes(
                flat,
                self.codebook.detach(),
                self.cfg.k,
                self.cfg.similarity,
                self.cfg.chunk_mb,
            )
            # one cheap fp32 row sum (no host sync): NaN/inf anywhere in a row makes it non-finite
            finite = torch.isfinite(flat.sum(-1, dtype=torch.float32))  # [T, G]
            if self.check_finite if check_finite is None else check_finite:
                self._raise_if_not_finite(finite)
            ids = ids.masked_fill(~finite[..., None], -1)
        lead = x_n.shape[:-2] if self.grouped else x_n.shape[:-1]
        return ids.reshape(*lead, *((self.cfg.n_groups,) if self.grouped else ()), self.cfg.k)

    def _raise_if_not_finite(self, finite: Tensor) -> None:
        if bool(finite.all()):
            return
        bad = int((~finite).sum())
        raise ValueError(
            f"{self.where}: {bad} of {finite.numel()} activation vectors contain NaN or inf; "
            "their codes would be meaningless. Check the inputs and the base model (a diverged "
            "checkpoint, or float16 overflow: run in bfloat16 or float32)"
        )

    def check_codes(self, codes: Tensor, like: Tensor | None = None) -> None:
        """Raise a clear error for a non-integer dtype, a wrong shape or ids outside
        ``[-1, n_codes)``. With ``like`` (the codes a hook was given), every axis but the last
        (slots, which patches may add or drop) must match it exactly."""
        what = f"{self.where}: codes"
        if not isinstance(codes, Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(codes).__name__}")
        if codes.dtype.is_floating_point or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(
                f"{what} must be an integer tensor, got dtype {codes.dtype} (shape "
                f"{tuple(codes.shape)}); return integer ids, e.g. codes.long()"
            )
        if like is not None and (codes.dim() != like.dim() or codes.shape[:-1] != like.shape[:-1]):
            raise ValueError(
                f"{what} returned by the hook have shape {tuple(codes.shape)} (dtype "
                f"{codes.dtype}); expected {tuple(like.shape)} ({like.dtype}), any number of "
                "slots in the last axis. Return a tensor of the given shape (edit it in place, or "
                "return None) instead of a slice, a reshape or a broadcast"
            )
        if self.grouped and (codes.dim() < 2 or codes.shape[-2] != self.cfg.n_groups):
            raise ValueError(
                f"grouped codes must have shape [..., n_groups={self.cfg.n_groups}, slots], "
                f"got {tuple(codes.shape)}"
            )
        bad = (codes < -1) | (codes >= self.cfg.n_codes)
        if codes.numel() and bool(bad.any()):
            raise ValueError(
                f"{self.where}: code ids must lie in [-1, {self.cfg.n_codes}) in every group (-1 "
                f"marks an empty slot); got min {int(codes.min())}, max {int(codes.max())}"
            )

    def decode(self, codes: Int[Tensor, "... k"]) -> Float[Tensor, "... d_in"]:
        """Combine the code vectors named by ``codes``; id -1 contributes nothing.

        Any number of slots may be given (patching may append codes). With ``combine="mean"``
        the sum is divided by ``cfg.k``, empty slots included, as in the reference. Ids are
        checked first (:meth:`check_codes`: in ``[-1, n_codes)`` within each group); the result
        has the codebook's dtype.
        """
        self.check_codes(codes)
        return self._decode(codes, self.codebook.dtype)

    def _decode(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        n_groups, n_codes, d = self.codebook.shape
        slots = codes.shape[-1]
        flat = codes.reshape(-1, n_groups, slots).long()
        valid = flat >= 0
        offs = torch.arange(n_groups, device=codes.device).view(1, -1, 1) * n_codes
        idx = (flat.clamp_min(0) + offs).reshape(-1, slots)
        w = valid.to(dtype).reshape(-1, slots)
        if self.cfg.combine == "mean":
            w = w / self.cfg.k
        table = self.codebook.reshape(n_groups * n_codes, d).to(dtype)
        out = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
        return out.reshape(*codes.shape[:-1], d)

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: Float[Tensor, "... d_in"], check_finite: bool | None = None
    ) -> Float[Tensor, "... d_in"]:
        """Quantize ``x``: value ``decode(encode(x))``, gradient straight through to ``x``, in
        ``x``'s dtype.

        Sets ``last_losses`` (``"recon"`` and ``"commit"`` as float32 tensors, no host sync) for
        the training loop; counts code usage while ``self.training``.
        """
        x_n = self.normalize_input(x)
        codes = self._select(x_n, check_finite)
        if self.training:
            self._count(codes)
            self._stash_recent(x_n)
        # Hooks may edit codes in place, so they get a copy; with no hooks there is nothing to
        # check and no second decode.
        is_patched = bool(self.hook_codes._forward_hooks)
        patched = self.hook_codes(codes.clone() if is_patched else codes)
        if is_patched:
            self.check_codes(patched, like=codes)
        x_hat_clean = self._decode(codes, x.dtype)
        x_hat = self._decode(patched, x.dtype) if is_patched else x_hat_clean
        if torch.is_grad_enabled():
            target = x_n.detach().float()
            self.last_losses = {  # mse_loss: one fused pass forward and backward
                "recon": F.mse_loss(x_hat_clean.float(), target),
                "commit": F.mse_loss(x_n.float(), x_hat_clean.detach().float()),
            }
        if self.cfg.use_error_term:
            return x if not is_patched else x + (x_hat - x_hat_clean)
        if not torch.is_grad_enabled():
            return x_hat  # the straight-through term below is exactly zero; skip two passes
        # straight-through: forward value x_hat, identity gradient to the (normalised) input
        return x_hat + (x_n - x_n.detach())

    def aux_loss(self) -> Tensor:
        """``recon_coef * recon + commit_coef * commit`` from the last forward (0 if none)."""
        if not self.last_losses:
            return self.codebook.new_zeros((), dtype=torch.float32)
        return (
            self.cfg.recon_coef * self.last_losses["recon"]
            + self.cfg.commit_coef * self.last_losses["commit"]
        )

    # ------------------------------------------------------------------ usage
    def _count(self, codes: Tensor) -> None:
        n_groups, n_codes = self.cfg.n_groups, self.cfg.n_codes
        flat = codes.reshape(-1, n_groups, codes.shape[-1])
        offs = torch.arange(n_groups, device=codes.device).view(1, -1, 1) * n_codes
        ids = (flat + offs)[flat >= 0]
        counts = torch.bincount(ids, minlength=n_groups * n_codes).view(n_groups, n_codes)
        self.code_counts += counts
        self.window_counts += counts

    def _stash_recent(self, x_n: Tensor) -> None:
        if self.cfg.recent_size == 0:
            return
        flat = x_n.detach().reshape(-1, self.cfg.n_groups, self.cfg.d_in)
        if flat.shape[0] > self.cfg.recent_size:
            idx = torch.randint(flat.shape[0], (self.cfg.recent_size,), device=flat.device)
            flat = flat[idx]
        self.recent = flat

    def reset_usage(self) -> None:
        """Zero the usage counters."""
        self.code_counts.zero_()
        self.window_counts.zero_()

    def dead_fraction(self, threshold: float = 1.0) -> Tensor:
        """Fraction of codes used fewer than ``threshold`` times (over ``code_counts``)."""
        return (self.code_counts < threshold).float().mean()

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_in={c.d_in}, n_codes={c.n_codes}, k={c.k}, n_groups={c.n_groups}, "
            f"similarity={c.similarity}, combine={c.combine}, input_norm={c.input_norm}"
        )
