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


def _prepare_codebook(codebook: Tensor, similarity: str) -> tuple[Tensor, Tensor | None]:
    """Codes as compared (unit-norm for cosine) and an additive score bias (euclidean)."""
    if similarity == "cosine":
        return F.normalize(codebook, dim=-1), None
    if similarity == "euclidean":
        # argmin |x-c|^2 == argmax x.c - |c|^2/2 (|x|^2 is constant per row)
        return codebook, -0.5 * codebook.pow(2).sum(-1)
    return codebook, None


def topk_codes(
    x: Float[Tensor, "n_tok n_groups d"],
    codebook: Float[Tensor, "n_groups n_codes d"],
    k: int,
    similarity: str = "cosine",
    chunk_mb: float = 256.0,
) -> Int[Tensor, "n_tok n_groups k"]:
    """Ids of the k most similar codes for each token and group, most similar first.

    Scores are computed one chunk at a time so that a chunk of the score matrix takes at most
    ``chunk_mb`` MiB; when even one token's scores exceed it, the codebook is chunked too and a
    running top-k is merged across code chunks.
    """
    n_tok, n_groups, _ = x.shape
    n_codes = codebook.shape[1]
    codes_cmp, bias = _prepare_codebook(codebook.to(x.dtype), similarity)
    codes_t = codes_cmp.transpose(1, 2)  # [G, d, N]
    xg = x.transpose(0, 1)  # [G, T, d]
    budget = max(1, int(chunk_mb * 2**20) // (4 * n_groups))  # score elements per group
    code_chunk = min(n_codes, max(k, budget // 64))
    tok_chunk = max(1, budget // code_chunk)
    out = torch.empty(n_groups, n_tok, k, dtype=torch.long, device=x.device)
    for t0 in range(0, n_tok, tok_chunk):
        xs = xg[:, t0 : t0 + tok_chunk]
        best_v: Tensor | None = None
        best_i: Tensor | None = None
        for c0 in range(0, n_codes, code_chunk):
            ct = codes_t[:, :, c0 : c0 + code_chunk]
            if bias is None:
                s = torch.bmm(xs, ct)
            else:
                s = torch.baddbmm(bias[:, None, c0 : c0 + code_chunk], xs, ct)
            kk = min(k, s.shape[-1])
            if kk == 1:
                v, i = s.max(dim=-1, keepdim=True)
            else:
                v, i = s.topk(kk, dim=-1)
            i = i + c0
            if best_v is None:
                best_v, best_i = v, i
            else:
                v = torch.cat([best_v, v], dim=-1)
                i = torch.cat([best_i, i], dim=-1)
                best_v, sel = v.topk(min(k, v.shape[-1]), dim=-1)
                best_i = i.gather(-1, sel)
        out[:, t0 : t0 + tok_chunk] = best_i
    return out.transpose(0, 1)


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
        patched = self.hook_codes(codes)
        is_patched = patched is not codes
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
