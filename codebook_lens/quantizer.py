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


# Tile geometry, tuned on a 2-core AVX-512 Xeon (docs/performance.md): a score tile small enough
# to stay cache-resident between the GEMM that writes it and the reduction that reads it, yet with
# enough rows to keep the GEMM efficient; chunk_mb only ever lowers it.
_TILE_BYTES = 4 * 2**20
_MIN_ROWS = 64
# Codes per block of the two-stage top-k: one vectorized block-max pass over the tile, then an
# exact top-k among the few blocks that can hold a winner (torch's max/topk over a full row are
# scalar loops, ~10x slower than amax).
_BLOCK = 128


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


def _plan(n_tok: int, n_groups: int, n_codes: int, elem: int, chunk_mb: float) -> tuple[int, int]:
    """(tokens, codes) per score tile; the tile holds at most ``chunk_mb`` MiB."""
    cap = max(1, int(chunk_mb * 2**20) // elem)
    per_group = max(1, min(cap, _TILE_BYTES // elem) // n_groups)
    rows = min(n_tok, _MIN_ROWS)
    if per_group >= n_codes * rows:  # whole codebook per tile: no merge across code chunks
        return min(n_tok, per_group // n_codes), n_codes
    codes = max(1, per_group // rows)
    if codes > _BLOCK:
        codes -= codes % _BLOCK
    rows = max(1, min(n_tok, per_group // codes))
    return rows, codes


def _plain_topk(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return s.max(-1, keepdim=True) if k == 1 else s.topk(k, dim=-1)


def _merge(bv: Tensor, bi: Tensor, v: Tensor, i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Running top-k: candidates (v, i) are later codes, so earlier ones win ties."""
    if k == 1 and bv.shape[-1] == 1 and v.shape[-1] == 1:
        take = v > bv
        return torch.where(take, v, bv), torch.where(take, i, bi)
    v, i = torch.cat([bv, v], dim=-1), torch.cat([bi, i], dim=-1)
    v, sel = v.topk(min(k, v.shape[-1]), dim=-1)
    return v, i.gather(-1, sel)


def _tile_topk(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k (values, column ids) along the last axis of a score tile ``[G, rows, codes]``."""
    n = s.shape[-1]
    k = min(k, n)
    nb = n // _BLOCK
    if nb < max(2, k):
        return _plain_topk(s, k)
    main = s[..., : nb * _BLOCK].unflatten(-1, (nb, _BLOCK))  # [G, R, nb, B]
    bmax = main.amax(-1)
    # the k blocks with the largest maxima hold the k largest scores
    blk = bmax.argmax(-1, keepdim=True) if k == 1 else bmax.topk(k, dim=-1).indices
    g_ix = torch.arange(s.shape[0], device=s.device).view(-1, 1, 1)
    r_ix = torch.arange(s.shape[1], device=s.device).view(1, -1, 1)
    cand = main[g_ix, r_ix, blk].flatten(-2)  # [G, R, k*B]
    v, j = _plain_topk(cand, k)
    i = blk.gather(-1, j // _BLOCK) * _BLOCK + j % _BLOCK
    if nb * _BLOCK < n:
        tv, ti = _plain_topk(s[..., nb * _BLOCK :], min(k, n - nb * _BLOCK))
        v, i = _merge(v, i, tv, ti + nb * _BLOCK, k)
    return v, i


def topk_codes(
    x: Float[Tensor, "n_tok n_groups d"],
    codebook: Float[Tensor, "n_groups n_codes d"],
    k: int,
    similarity: str = "cosine",
    chunk_mb: float = 256.0,
) -> Int[Tensor, "n_tok n_groups k"]:
    """Ids of the k most similar codes for each token and group, most similar first.

    Scores are computed one tile of tokens x codes at a time, for all groups in one batched GEMM;
    a tile never exceeds ``chunk_mb`` MiB (it is smaller when a cache-sized tile is faster). When
    the codebook is chunked too, a running top-k is merged across code chunks. The result equals
    the unchunked ``scores.topk(k)`` up to the order of exact ties.
    """
    n_tok, n_groups, _ = x.shape
    n_codes = codebook.shape[1]
    codes_cmp, bias = _prepare_codebook(codebook.to(x.dtype), similarity)
    codes_t = codes_cmp.transpose(1, 2)  # [G, d, N]
    xg = x.transpose(0, 1)  # [G, T, d]
    rows, width = _plan(n_tok, n_groups, n_codes, x.element_size(), chunk_mb)
    buf = x.new_empty(n_groups * rows * width)  # one tile buffer reused by every GEMM
    out = torch.empty(n_tok, n_groups, k, dtype=torch.long, device=x.device)
    for t0 in range(0, n_tok, rows):
        xs = xg[:, t0 : t0 + rows]
        r = xs.shape[1]
        best_v: Tensor | None = None
        best_i: Tensor | None = None
        for c0 in range(0, n_codes, width):
            c = min(width, n_codes - c0)
            s = buf[: n_groups * r * c].view(n_groups, r, c)
            if bias is None:
                torch.bmm(xs, codes_t[:, :, c0 : c0 + c], out=s)
            else:
                torch.baddbmm(bias[:, None, c0 : c0 + c], xs, codes_t[:, :, c0 : c0 + c], out=s)
            v, i = _tile_topk(s, k)
            if c0:
                i = i + c0
            if best_v is None or best_i is None:
                best_v, best_i = v, i
            else:
                best_v, best_i = _merge(best_v, best_i, v, i, k)
        out[t0 : t0 + r] = best_i.transpose(0, 1)
    return out


class Codebook(nn.Module):
    """A (possibly grouped) codebook quantizer.

    The code vectors are one parameter ``codebook`` of shape ``[n_groups, n_codes, d_in]``.
    Ungrouped codebooks take ``[..., d_in]`` and give codes ``[..., k]``; grouped ones take
    ``[..., n_groups, d_in]`` and give ``[..., n_groups, k]``. Code id ``-1`` is an empty slot.

    Hook points: ``hook_codes`` sees the chosen ids; a hook returning modified ids changes what
    ``forward`` emits (that is how patching works). When attached by :class:`CodebookModel` it is
    named ``f"{site}.hook_codes"``.
    """

    def __init__(self, cfg: CodebookConfig):
        super().__init__()
        if not isinstance(cfg, CodebookConfig):
            raise TypeError(f"Codebook expects a CodebookConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        init = torch.randn(cfg.n_groups, cfg.n_codes, cfg.d_in, generator=g)
        if cfg.similarity == "cosine" or cfg.input_norm == "layernorm":
            scale = math.sqrt(cfg.d_in) if cfg.input_norm == "layernorm" else 1.0
            init = F.normalize(init, dim=-1) * scale
        else:
            init = init / math.sqrt(cfg.d_in)
        self.codebook = nn.Parameter(init)
        self.hook_codes = HookPoint()
        self.register_buffer("code_counts", torch.zeros(cfg.n_groups, cfg.n_codes))
        self.register_buffer(
            "window_counts", torch.zeros(cfg.n_groups, cfg.n_codes), persistent=False
        )
        self.last_losses: dict[str, Tensor] = {}
        self.recent: Tensor | None = None
        self.enabled = True

    # ------------------------------------------------------------------ shapes
    @property
    def grouped(self) -> bool:
        """Whether inputs carry an explicit group axis (``n_groups > 1``)."""
        return self.cfg.n_groups > 1

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
        """The activation as the codes see it (LayerNorm without affine when configured)."""
        if self.cfg.input_norm == "layernorm":
            return F.layer_norm(x, (self.cfg.d_in,))
        return x

    # ------------------------------------------------------------------ encode / decode
    def encode(self, x: Float[Tensor, "... d_in"]) -> Int[Tensor, "... k"]:
        """Ids of the k most similar codes, most similar in slot 0 (no gradient)."""
        return self._select(self.normalize_input(x))

    def _select(self, x_n: Tensor) -> Tensor:
        flat = self._flatten(x_n)
        with torch.no_grad():
            ids = topk_codes(
                flat.detach(),
                self.codebook.detach(),
                self.cfg.k,
                self.cfg.similarity,
                self.cfg.chunk_mb,
            )
        lead = x_n.shape[:-2] if self.grouped else x_n.shape[:-1]
        return ids.reshape(*lead, *((self.cfg.n_groups,) if self.grouped else ()), self.cfg.k)

    def check_codes(self, codes: Tensor) -> None:
        """Raise a clear error for ids outside ``[-1, n_codes)`` or a wrong shape/dtype."""
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if self.grouped and (codes.dim() < 2 or codes.shape[-2] != self.cfg.n_groups):
            raise ValueError(
                f"grouped codes must have shape [..., n_groups={self.cfg.n_groups}, slots], "
                f"got {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < -1 or int(codes.max()) >= self.cfg.n_codes):
            raise ValueError(
                f"code ids must lie in [-1, {self.cfg.n_codes}) (-1 marks an empty slot); got "
                f"min {int(codes.min())}, max {int(codes.max())}"
            )

    def decode(self, codes: Int[Tensor, "... k"]) -> Float[Tensor, "... d_in"]:
        """Combine the code vectors named by ``codes``; id -1 contributes nothing.

        Any number of slots may be given (patching may append codes). With ``combine="mean"``
        the sum is divided by ``cfg.k``, empty slots included, as in the reference.
        """
        n_groups, n_codes, d = self.codebook.shape
        slots = codes.shape[-1]
        flat = codes.reshape(-1, n_groups, slots).long()
        valid = flat >= 0
        offs = torch.arange(n_groups, device=codes.device).view(1, -1, 1) * n_codes
        idx = (flat.clamp_min(0) + offs).reshape(-1, slots)
        w = valid.to(self.codebook.dtype).reshape(-1, slots)
        if self.cfg.combine == "mean":
            w = w / self.cfg.k
        out = F.embedding_bag(
            idx, self.codebook.reshape(n_groups * n_codes, d), per_sample_weights=w, mode="sum"
        )
        return out.reshape(*codes.shape[:-1], d)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """Quantize ``x``: value ``decode(encode(x))``, gradient straight through to ``x``.

        Sets ``last_losses`` (``"recon"`` and ``"commit"`` as tensors, no host sync) for the
        training loop; counts code usage while ``self.training``.
        """
        x_n = self.normalize_input(x)
        codes = self._select(x_n)
        if self.training:
            self._count(codes)
            self._stash_recent(x_n)
        # Hooks may edit codes in place, so they get a copy; with no hooks there is nothing to
        # check and no second decode.
        is_patched = bool(self.hook_codes._forward_hooks)
        patched = self.hook_codes(codes.clone() if is_patched else codes)
        if is_patched:
            self.check_codes(patched)
        x_hat_clean = self.decode(codes)
        x_hat = self.decode(patched) if is_patched else x_hat_clean
        if torch.is_grad_enabled():
            target = x_n.detach()
            self.last_losses = {
                "recon": (x_hat_clean - target).pow(2).mean(),
                "commit": (x_n - x_hat_clean.detach()).pow(2).mean(),
            }
        if self.cfg.use_error_term:
            return x if not is_patched else x + (x_hat - x_hat_clean)
        # straight-through: forward value x_hat, identity gradient to the (normalised) input
        return x_hat + (x_n - x_n.detach())

    def aux_loss(self) -> Tensor:
        """``recon_coef * recon + commit_coef * commit`` from the last forward (0 if none)."""
        if not self.last_losses:
            return self.codebook.new_zeros(())
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
