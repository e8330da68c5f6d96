"""`Codebook`: a top-k vector-quantization bottleneck with TransformerLens hook points.

``encode`` picks, per position (and per group), the k codes most similar to the activation;
``decode`` combines their vectors; ``forward`` is ``decode(encode(x))`` with a straight-through
gradient to ``x``. The top-k selection itself is :func:`codebook_lens.topk.topk_codes`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from codebook_lens import topk
from codebook_lens.config import CodebookConfig

__all__ = ["Codebook"]


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
        self.register_buffer("code_counts", torch.zeros(cfg.n_groups, cfg.n_codes))
        self.register_buffer(
            "window_counts", torch.zeros(cfg.n_groups, cfg.n_codes), persistent=False
        )
        self.last_losses: dict[str, Tensor] = {}
        self.recent: Tensor | None = None
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

    def dead_fraction(self, threshold: float = 1.0) -> Tensor:
        """Fraction of codes used fewer than ``threshold`` times (over ``code_counts``)."""
        return (self.code_counts < threshold).float().mean()

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_in={c.d_in}, n_codes={c.n_codes}, k={c.k}, n_groups={c.n_groups}, "
            f"similarity={c.similarity}, combine={c.combine}, input_norm={c.input_norm}"
        )
