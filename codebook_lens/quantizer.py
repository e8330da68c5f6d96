"""`Codebook`: a top-k vector-quantization bottleneck with TransformerLens hook points.

``encode`` picks, per position (and per group), the k codes most similar to the activation;
``decode`` combines their vectors; ``forward`` is ``decode(encode(x))`` with a straight-through
gradient to ``x``. The top-k selection itself is :func:`codebook_lens.topk.topk_codes`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from codebook_lens import maintenance, topk
from codebook_lens.config import CodebookConfig
from codebook_lens.errors import CheckpointError
from codebook_lens.tensor_files import check_tensor

__all__ = ["Codebook"]


class Codebook(nn.Module):
    """A (possibly grouped) codebook quantizer.

    The code vectors are one parameter ``codebook`` of shape ``[n_groups, n_codes, d_in]``.
    Ungrouped codebooks take ``[..., d_in]`` and give codes ``[..., k]``; grouped ones take
    ``[..., n_groups, d_in]`` and give ``[..., n_groups, k]``. Code id ``-1`` is an empty slot.

    State (``state_dict()``, shapes in :meth:`state_shapes`): the parameters ``codebook`` and,
    with ``input_norm="affine"``, ``ln_weight``/``ln_bias``; the buffers ``code_counts`` (uses
    since the last :meth:`reset_usage`), ``window_counts`` (uses since the usage window last
    restarted, which maintenance reads) and ``recent`` (``[rows, n_groups, d_in]``, activations
    of the last training forward, the seeds of re-seeded codes; no rows before one). Only the
    codebook's own methods change the buffers.

    Hook points: ``hook_codes`` sees the chosen ids; a hook returning modified ids changes what
    ``forward`` emits (that is how patching works). When attached by :class:`CodebookModel` it is
    named ``f"{site}.hook_codes"``.

    dtypes: the parameters keep their own dtype (float32 unless you cast them, e.g. with
    ``cm.to(torch.bfloat16)``) and are cast to the activation's dtype at use, so the output has
    the activation's dtype (bf16/fp16/fp32). Scores are computed in the activation's dtype,
    float16 in float32; the losses are float32.

    Non-finite activations: rows with NaN/inf get empty codes (-1) instead of arbitrary ones, a
    device-side step with no host sync, and the NaN/inf is carried into the output, so a broken
    model is never made to look finite by its codebooks. With ``check_finite`` (the attribute,
    or the argument of :meth:`encode`/:meth:`forward`) they raise ``ValueError`` instead, at the
    cost of one host sync per call; :class:`CodebookModel` turns it on in its analysis entry points.

    Memory: on the CPU the codebook keeps the memory of its score tile between calls (the
    ``workspace`` attribute, a :class:`codebook_lens.topk.Workspace`: at most 64 MiB, or
    ``chunk_mb`` if smaller), because fresh pages on every call cost about a third of the tile's
    GEMM. ``cb.workspace.clear()`` lets it go; codebooks may share one workspace.
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
        # every tensor of the codebook's state is a parameter or a persistent buffer, so
        # state_dict() holds it all (see state_shapes)
        self.register_buffer("code_counts", torch.zeros(cfg.n_groups, cfg.n_codes))
        self.register_buffer("window_counts", torch.zeros(cfg.n_groups, cfg.n_codes))
        self.register_buffer("recent", torch.zeros(0, cfg.n_groups, cfg.d_in))
        self.register_load_state_dict_pre_hook(self._fit_recent)
        self.last_losses: dict[str, Tensor] = {}
        self.enabled = True
        self.check_finite = False
        # memory of the score tile, reused by every encode (kept on the CPU only; see Workspace)
        self.workspace = topk.Workspace()

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

    def flatten_input(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "rows n_groups d_in"]:
        """``x`` (``[..., d_in]``, or ``[..., n_groups, d_in]`` when grouped) as rows
        ``[rows, n_groups, d_in]``, the layout the codes are scored in; raises ``ValueError``
        naming the expected shape when ``x`` does not fit this codebook."""
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

    # ------------------------------------------------------------------ state
    COUNTS = ("code_counts", "window_counts")
    """The state tensors that hold usage counts (integer-valued, non-negative)."""

    TRAINING_STATE = ("window_counts", "recent")
    """The state a training run keeps (training checkpoints) but a saved model does not."""

    @staticmethod
    def state_shapes(cfg: CodebookConfig) -> dict[str, tuple[int | None, ...]]:
        """The shape of each tensor of ``state_dict()`` of a codebook built from ``cfg``, by
        name, in ``state_dict()`` order (``None``: any size, the rows of ``recent``)."""
        g, n, d = cfg.n_groups, cfg.n_codes, cfg.d_in
        shapes: dict[str, tuple[int | None, ...]] = {"codebook": (g, n, d)}
        if cfg.input_norm == "affine":
            shapes.update(ln_weight=(g, d), ln_bias=(g, d))
        shapes.update(code_counts=(g, n), window_counts=(g, n), recent=(None, g, d))
        return shapes

    @staticmethod
    def checked_state(
        tensors: Mapping[str, Tensor],
        cfg: CodebookConfig,
        file: Path | str,
        prefix: str = "",
        training: bool = False,
    ) -> dict[str, Tensor]:
        """The state of a codebook built from ``cfg``, read from ``file`` (a path, or words
        naming the source): the tensors ``prefix + name`` of ``tensors`` for each name of
        :meth:`state_shapes`, each checked by :func:`~codebook_lens.tensor_files.check_tensor`
        (dtype, shape, finite, counts >= 0), keyed by name as :meth:`load_state_dict` takes
        them. A saved model holds the parameters and (optionally) ``code_counts``; with
        ``training`` (a training checkpoint) :attr:`TRAINING_STATE` is read too, ``recent``
        optionally. Every reader of saved codebooks uses it; a missing tensor or a bad one
        raises :class:`~codebook_lens.errors.CheckpointError` naming it."""
        optional = ("recent",) if training else ("code_counts",)
        out = {}
        for name, shape in Codebook.state_shapes(cfg).items():
            key = prefix + name
            if name in Codebook.TRAINING_STATE and not training:
                continue
            if key not in tensors:
                if name in optional:
                    continue
                raise CheckpointError(f"{file} has no tensor {key!r}; the checkpoint is incomplete")
            kind = "count" if name in Codebook.COUNTS else "float"
            out[name] = check_tensor(tensors[key], key, file, shape, kind)
        return out

    @staticmethod
    def _fit_recent(module: Codebook, state_dict: Mapping[str, Any], prefix: str, *_: Any) -> None:
        """Before a state is loaded (a ``load_state_dict`` pre-hook): ``recent`` takes the
        number of rows and the dtype of the saved one, which vary with the last batch."""
        saved = state_dict.get(prefix + "recent")
        if (
            isinstance(saved, Tensor)
            and saved.dim() == 3
            and saved.shape[1:] == module.recent.shape[1:]
        ):
            module.recent = module.recent.new_empty(saved.shape, dtype=saved.dtype)

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self, x: Float[Tensor, "... d_in"], check_finite: bool | None = None
    ) -> Int[Tensor, "... k"]:
        """Ids of the k most similar codes, most similar in slot 0 (no gradient).

        Positions (and groups) whose activation is not finite get -1 in every slot; with
        ``check_finite`` (default: the ``check_finite`` attribute) they raise ``ValueError``.
        """
        self._check_dtype(x)
        return self._select(self.normalize_input(x), check_finite)

    def _check_dtype(self, x: Tensor) -> None:
        """Refuse activations that are not real floating point (a dtype check: no host sync)."""
        if not x.is_floating_point():
            raise TypeError(
                f"{self.where}: activations must be a floating-point tensor (float32, bfloat16, "
                f"float16 or float64), got {x.dtype}; quantize a model's activations, or cast "
                "the input with .float()"
            )

    def _select(self, x_n: Tensor, check_finite: bool | None = None) -> Tensor:
        flat = self.flatten_input(x_n)
        with torch.no_grad():
            flat = flat.detach()
            ids = topk.topk_codes(
                flat,
                self.codebook.detach(),
                self.cfg.k,
                self.cfg.similarity,
                self.cfg.chunk_mb,
                self.workspace,
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
        if slots == 0:  # a patch removed every slot: nothing is combined
            return self.codebook.new_zeros((*codes.shape[:-1], d), dtype=dtype)
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
        self._check_dtype(x)
        x_n = self.normalize_input(x)
        codes = self._select(x_n, check_finite)
        if self.training:
            self._count(codes)
            self._stash_recent(x_n)
        # Hooks may edit codes in place, so they get a copy; with no hooks there is nothing to
        # check and no second decode. HookPoint.add_hook (behind every TransformerLens hook API)
        # records each forward hook, so has_hooks sees them all.
        is_patched = self.hook_codes.has_hooks("fwd")
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
            # x_n - x_n is 0 where x_n is finite and NaN where it is not: a broken activation
            # stays visible downstream (its codes are empty), with no host sync.
            return x_hat + (x_n - x_n)
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

    def restart_window(self) -> None:
        """Restart the usage window (``window_counts``) that maintenance reads."""
        self.window_counts.zero_()

    @torch.no_grad()
    def set_usage(
        self, code_counts: Tensor | None = None, window_counts: Tensor | None = None
    ) -> None:
        """Set the usage counters (those given) to these counts, ``[n_groups, n_codes]``: e.g.
        the totals over the processes of a distributed run."""
        for buf, counts in ((self.code_counts, code_counts), (self.window_counts, window_counts)):
            if counts is not None:
                buf.copy_(counts)

    # ------------------------------------------------------------------ maintenance
    def maintenance_due(self, step: int) -> bool:
        """Whether maintenance runs after optimizer step ``step`` (counted from 1): some
        maintenance is on (``dead_code_threshold > 0`` or ``merge_threshold > 0``) and ``step``
        is a multiple of ``cfg.replace_every``."""
        c = self.cfg
        return (c.dead_code_threshold > 0 or c.merge_threshold > 0) and step % c.replace_every == 0

    @torch.no_grad()
    def reseed_dead_codes(self, threshold: float | None = None) -> Bool[Tensor, "n_groups n_codes"]:
        """Re-seed the codes used fewer than ``threshold`` times in the usage window (default
        ``cfg.dead_code_threshold``) from the recent training activations, restart the window,
        and return the mask of re-seeded codes (all False when ``threshold <= 0`` or no
        training forward has run yet). ``.sum()`` counts them."""
        threshold = self.cfg.dead_code_threshold if threshold is None else threshold
        dead = self.window_counts < threshold  # [G, N]
        self.restart_window()
        if self.recent.shape[0] == 0 or threshold <= 0:
            return torch.zeros_like(dead)
        self.codebook.copy_(maintenance.reseeded(self.codebook, dead, self.recent))
        return dead

    @torch.no_grad()
    def merge_duplicate_codes(
        self, threshold: float | None = None, chunk_mb: float = 64.0
    ) -> Bool[Tensor, "n_groups n_codes"]:
        """Park every used code that has a more-used near-duplicate; return the parked codes.

        Among the codes used in the usage window (``window_counts > 0``), code ``i`` is parked
        when a code ``j`` of the same group with more uses (on a tie, the lower id) has cosine
        similarity above ``threshold`` (default ``cfg.merge_threshold``; ``<= 0`` parks
        nothing). A parked code becomes the zero vector, which scores 0 under every similarity,
        so the positions that chose it move to their next-best code (in practice the
        near-duplicate) and it stays unused while some code scores above 0. It is re-seeded
        later only if dead-code replacement is on. The usage window is left for the caller to
        restart.

        Why: with many more codes than the site has distinct states, a cluster stretched along a
        nuisance direction (position, say) is split between several codes, each a
        perfect-precision but low-recall detector; merging them gives one code per feature.
        """
        threshold = self.cfg.merge_threshold if threshold is None else threshold
        parked = maintenance.duplicates(self.codebook, self.window_counts, threshold, chunk_mb)
        if threshold > 0:
            self.codebook.masked_fill_(parked[..., None], 0.0)
        return parked

    @torch.no_grad()
    def maintain(self) -> Bool[Tensor, "n_groups n_codes"]:
        """One maintenance pass: :meth:`merge_duplicate_codes`, then :meth:`reseed_dead_codes`
        (which restarts the usage window); returns the mask of codes that were parked or
        re-seeded, whose optimizer moments the caller should reset."""
        return self.merge_duplicate_codes() | self.reseed_dead_codes()

    def dead_fraction(self, threshold: float = 1.0) -> Tensor:
        """Fraction of codes used fewer than ``threshold`` times (over ``code_counts``)."""
        return (self.code_counts < threshold).float().mean()

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_in={c.d_in}, n_codes={c.n_codes}, k={c.k}, n_groups={c.n_groups}, "
            f"similarity={c.similarity}, combine={c.combine}, input_norm={c.input_norm}"
        )
