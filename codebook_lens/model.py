"""`CodebookModel`: codebooks attached at hook points of a HookedTransformer or TransformerBridge.

Each codebook runs as a permanent forward hook at its site, so every TransformerLens entry point
(``__call__``, ``run_with_cache``, ``run_with_hooks``, ``hooks``, ``generate``) runs with it. The
site keeps meaning "what the model uses downstream" (the quantized value), and the chosen codes
pass through a hook point registered on the model as ``f"{site}.hook_codes"``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from codebook_lens.backends import backend_of
from codebook_lens.config import CodebookConfig
from codebook_lens.errors import CheckpointError
from codebook_lens.hub import resolve_dir
from codebook_lens.init import init_from_activations
from codebook_lens.io import SavedCodebooks, read_codebooks, write_codebooks
from codebook_lens.quantizer import Codebook
from codebook_lens.suggest import did_you_mean, unknown_site_error
from codebook_lens.validation import check_tokens

__all__ = ["CodebookModel", "codes_hook_name", "Layout"]

_UNQUANTIZABLE = ("hook_pattern", "hook_attn_scores", "hook_codes", "hook_tokens")


def codes_hook_name(site: str) -> str:
    """The hook name under which the codes of ``site`` are cached and patched."""
    return f"{site}.hook_codes"


Layout = Literal["flat", "split", "heads", "heads_flat"]
"""How a codebook sits at its site (:meth:`CodebookModel.site_layout`): ``flat``, a ``[b, p, d]``
site with one codebook; ``split``, a ``[b, p, d]`` site cut into ``n_groups`` groups of ``d_in``;
``heads``, a per-head ``[b, p, head, d_head]`` site, one codebook per head (or one shared);
``heads_flat``, a per-head site quantized as one ``[b, p, head * d_head]`` vector."""


def _codebook_view(act: Tensor, layout: Layout, n_groups: int) -> Tensor:
    """The activation ``act`` (``[..., *site shape]``) as the codebook at a ``layout`` site
    takes it: ``split`` cuts the last axis into ``n_groups`` groups, ``heads_flat`` joins the
    heads into one vector, ``flat`` and ``heads`` are as they are."""
    if layout == "split":
        return einops.rearrange(act, "... (g d) -> ... g d", g=n_groups)
    if layout == "heads_flat":
        return einops.rearrange(act, "... h d -> ... (h d)")
    return act


def _site_view(out: Tensor, layout: Layout, site_shape: torch.Size) -> Tensor:
    """The codebook's output ``out`` back in the site's shape (the inverse of
    :func:`_codebook_view`; ``site_shape`` is the activation's)."""
    if layout == "split":
        return einops.rearrange(out, "... g d -> ... (g d)")
    if layout == "heads_flat":
        return einops.rearrange(out, "... (h d) -> ... h d", h=site_shape[-2])
    return out


@dataclass
class _Attachment:
    """How one codebook sits at its site."""

    site: str
    layout: Layout
    handle: Any  # TL LensHandle of the permanent hook


class CodebookModel(nn.Module):
    """A TransformerLens model with codebook quantizers at some of its hook points.

    >>> cm = CodebookModel(model)
    >>> cm.add_codebook("blocks.0.attn.hook_z", n_codes=1000, k=1)  # one codebook per head
    >>> logits, cache = cm.run_with_cache(tokens)
    >>> cache["blocks.0.attn.hook_z.hook_codes"].shape  # [batch, pos, head, k]
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, CodebookModel):
            raise TypeError(
                "CodebookModel wraps a TransformerLens model, got a CodebookModel; add codebooks "
                "to that one with add_codebook(...)"
            )
        self.backend = backend_of(model)
        taken = sorted(n for n in model.hook_dict if n.endswith(".hook_codes"))
        if taken:
            raise ValueError(
                f"this model already has codebooks attached by another CodebookModel (codes "
                f"hooks {taken}); use that CodebookModel, or call its detach() first (two "
                "CodebookModels on one model would chain their quantizers)"
            )
        self.model = model
        self._cbs = nn.ModuleDict()
        self._att: dict[str, _Attachment] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self.enabled = True
        # NaN/inf activations at a codebook raise ValueError when True; when False they get
        # empty codes (-1) silently; None (default): raise in the analysis entry points
        # (run_with_cache, run_with_hooks, init_codebooks; one host sync per codebook per
        # forward), not in forward/generate/hooks (the training hot path).
        self.check_finite: bool | None = None
        self._check_now: bool | None = None
        self.train(model.training)

    # ------------------------------------------------------------------ bookkeeping
    @staticmethod
    def _key(site: str) -> str:
        return site.replace(".", "__")

    @property
    def codebooks(self) -> dict[str, Codebook]:
        """Attached codebooks by site name (a fresh dict; use ``add``/``remove`` to change)."""
        return {site: self._cbs[self._key(site)] for site in self._att}

    @property
    def sites(self) -> list[str]:
        """Sites that have a codebook, in attachment order."""
        return list(self._att)

    @property
    def cfg(self) -> Any:
        """The wrapped model's config."""
        return self.model.cfg

    def codebook(self, site: str) -> Codebook:
        """The codebook attached at ``site``; a KeyError naming close matches otherwise."""
        if site not in self._att:
            raise unknown_site_error(site, self.sites)
        return self._cbs[self._key(site)]

    def site_layout(self, site: str) -> Layout:
        """How the codebook at ``site`` sits there (see :data:`Layout`), read off the site's
        activation shape when it was attached."""
        self.codebook(site)  # the KeyError for an unknown site
        return self._att[site].layout

    def codebook_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the codebooks only (not of the base model)."""
        return self._cbs.parameters()

    def hook_names(self) -> list[str]:
        """All hook names of the wrapped model, codes hooks included."""
        return sorted(self.model.hook_dict)

    def _site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Trailing activation shape (after batch, pos) of every hook point, probed once."""
        if self._shapes is None:
            device = next(self.model.parameters()).device
            tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
            with self.disabled(), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, cache = self.model.run_with_cache(tokens)
            shapes = {
                n: tuple(a.shape[2:])
                for n, a in cache.items()
                if isinstance(a, Tensor) and not n.endswith(".hook_codes")
            }
            self._shapes = shapes
        return self._shapes

    def _check_site(self, site: str) -> None:
        if not isinstance(site, str):
            raise TypeError(
                f"site must be a hook name (str) such as 'blocks.0.hook_mlp_out', got "
                f"{site!r} of type {type(site).__name__}; see cm.hook_names()"
            )
        names = [n for n in self.model.hook_dict if not n.endswith(".hook_codes")]
        if site not in names:
            hint = did_you_mean(site, names, n=5)
            raise KeyError(
                f"unknown hook point {site!r} on this {self.backend} model.{hint} "
                "See cm.hook_names() for all names."
            )
        if any(site.endswith(s) for s in _UNQUANTIZABLE):
            raise ValueError(
                f"{site!r} is not an activation that can be quantized; choose a residual, MLP or "
                "per-head site such as blocks.0.attn.hook_z or blocks.0.hook_mlp_out"
            )

    def _site_shape(self, site: str) -> tuple[int, ...]:
        shape = self._site_shapes().get(site)
        if shape is None:
            raise ValueError(
                f"{site!r} did not fire on a forward pass of this {self.backend} model, so it "
                "cannot be quantized; choose a site that does (see cm.hook_names())"
            )
        return shape

    def _layout(self, site: str, cfg: CodebookConfig) -> Layout:
        shape = self._site_shape(site)
        if len(shape) == 1:
            (d,) = shape
            if cfg.n_groups == 1 and cfg.d_in == d:
                return "flat"
            if cfg.n_groups > 1 and cfg.n_groups * cfg.d_in == d:
                return "split"
            raise ValueError(
                f"{site} has activations of size {d}, but the codebook config has d_in={cfg.d_in}"
                f" and n_groups={cfg.n_groups}; use d_in={d} (or n_groups * d_in == {d})"
            )
        if len(shape) == 2:
            h, dh = shape
            if cfg.d_in == dh and cfg.n_groups in (1, h):
                return "heads"
            if cfg.d_in == h * dh and cfg.n_groups == 1:
                return "heads_flat"
            raise ValueError(
                f"{site} is a per-head site with {h} heads of size {dh}, but the codebook config "
                f"has d_in={cfg.d_in} and n_groups={cfg.n_groups}; use d_in={dh} with "
                f"n_groups={h} (one codebook per head) or 1 (shared), or d_in={h * dh}"
            )
        raise ValueError(
            f"{site} has activation shape {shape}; only [b, p, d] and "
            "[b, p, head, d] sites can be quantized"
        )

    def _default_cfg(self, site: str, overrides: dict[str, Any]) -> CodebookConfig:
        shape = self._site_shape(site)
        if "n_codes" not in overrides:
            raise TypeError(
                "add_codebook needs a CodebookConfig, a Codebook, or at least n_codes=..."
            )
        if len(shape) == 2:
            overrides = {"d_in": shape[1], "n_groups": shape[0], **overrides}
        elif len(shape) == 1:
            overrides = {"d_in": shape[0], **overrides}
        return CodebookConfig(**overrides)

    # ------------------------------------------------------------------ attach / remove
    def add_codebook(
        self,
        site: str,
        cfg_or_codebook: CodebookConfig | Codebook | None = None,
        **overrides: Any,
    ) -> Codebook:
        """Attach a codebook at ``site`` and return it.

        Pass a :class:`CodebookConfig`, an existing :class:`Codebook`, or just config fields
        (``n_codes=...``, ``k=...``); then ``d_in`` and ``n_groups`` are read off the site, with
        one codebook per head at per-head sites (``attn.hook_z``, ``hook_q/k/v``,
        ``attn.hook_result``).
        """
        self._check_site(site)
        if site in self._att:
            raise ValueError(f"{site} already has a codebook; remove_codebook({site!r}) first")
        if codes_hook_name(site) in self.model.hook_dict:
            raise ValueError(
                f"{site} already has a codebook attached by another CodebookModel; use that one "
                "or call its detach() first"
            )
        if isinstance(cfg_or_codebook, Codebook):
            if overrides:
                raise TypeError("pass either a Codebook or config fields, not both")
            cb = cfg_or_codebook
        else:
            if cfg_or_codebook is None:
                cfg = self._default_cfg(site, overrides)
            elif isinstance(cfg_or_codebook, CodebookConfig):
                cfg = cfg_or_codebook.replace(**overrides) if overrides else cfg_or_codebook
            else:
                raise TypeError(
                    f"add_codebook: cfg_or_codebook must be a CodebookConfig or a Codebook, got "
                    f"{cfg_or_codebook!r} of type {type(cfg_or_codebook).__name__}; pass config "
                    f"fields by name instead, e.g. add_codebook({site!r}, n_codes=...)"
                )
            cb = Codebook(cfg)
        layout = self._layout(site, cb.cfg)
        param = next(self.model.parameters())
        cb.to(param.device)
        cb.train(self.training)  # usage is counted only while training
        self._cbs[self._key(site)] = cb
        self._register_codes_hook(site, cb.hook_codes)
        self._att[site] = _Attachment(site, layout, None)
        self._install(site)
        return cb

    def remove_codebook(self, site: str) -> Codebook:
        """Detach the codebook at ``site`` and return it; the site is a plain activation again."""
        self.codebook(site)  # the KeyError for an unknown site
        att = self._att.pop(site)
        self._uninstall(att)
        self._unregister_codes_hook(site)
        return self._cbs.pop(self._key(site))

    def detach(self) -> nn.Module:
        """Remove every codebook and return the base model, unchanged."""
        for site in list(self._att):
            self.remove_codebook(site)
        return self.model

    # ------------------------------------------------------------------ hooks plumbing
    def _register_codes_hook(self, site: str, hp: HookPoint) -> None:
        name = codes_hook_name(site)
        hp.name = name
        reg = getattr(self.model, "_hook_registry", None)
        if isinstance(reg, dict):
            reg[name] = hp
        else:
            self.model.hook_dict[name] = hp
            self.model.mod_dict[name] = hp

    def _unregister_codes_hook(self, site: str) -> None:
        name = codes_hook_name(site)
        reg = getattr(self.model, "_hook_registry", None)
        for d in (reg, getattr(self.model, "mod_dict", None)):
            if isinstance(d, dict):
                d.pop(name, None)
        if reg is None:
            self.model.hook_dict.pop(name, None)

    def _make_hook(self, site: str):
        key = self._key(site)

        def quantize(act: Tensor, hook: HookPoint) -> Tensor | None:
            cb = self._cbs[key]
            if not (self.enabled and cb.enabled):
                return None
            layout = self._att[site].layout
            out = cb(_codebook_view(act, layout, cb.cfg.n_groups), self._check_now)
            return _site_view(out, layout, act.shape)

        return quantize

    def _install(self, site: str) -> None:
        hp = self.model.hook_dict[site]
        hp.add_hook(self._make_hook(site), dir="fwd", is_permanent=True)
        self._att[site].handle = hp.fwd_hooks[-1]

    def _uninstall(self, att: _Attachment) -> None:
        hp = self.model.hook_dict.get(att.site)
        handle = att.handle
        if hp is not None and handle is not None and handle in hp.fwd_hooks:
            handle.hook.remove()
            hp.fwd_hooks.remove(handle)

    def _ensure_hooks(self) -> None:
        """Re-install hooks removed by ``model.reset_hooks(including_permanent=True)``, and the
        codes hook points that a rebuilt hook registry dropped (SAELens's ``add_sae`` calls
        ``model.setup()``)."""
        for site, att in self._att.items():
            if codes_hook_name(site) not in self.model.hook_dict:
                self._register_codes_hook(site, self._cbs[self._key(site)].hook_codes)
            if att.handle not in self.model.hook_dict[site].fwd_hooks:
                self._install(site)

    # ------------------------------------------------------------------ enable / disable
    @contextmanager
    def disabled(self, *sites: str) -> Iterator[CodebookModel]:
        """Temporarily run the base activations at ``sites`` (all sites if none given)."""
        for s in sites:
            self.codebook(s)  # the KeyError for an unknown site
        if not sites:
            prev = self.enabled
            self.enabled = False
            try:
                yield self
            finally:
                self.enabled = prev
            return
        cbs = [self.codebook(s) for s in sites]
        prev_flags = [cb.enabled for cb in cbs]
        for cb in cbs:
            cb.enabled = False
        try:
            yield self
        finally:
            for cb, flag in zip(cbs, prev_flags):
                cb.enabled = flag

    def enable(self, *sites: str) -> None:
        """Turn codebooks on (all, or only ``sites``)."""
        self._set(True, sites)

    def disable(self, *sites: str) -> None:
        """Turn codebooks off (all, or only ``sites``) until :meth:`enable`."""
        self._set(False, sites)

    def _set(self, flag: bool, sites: tuple[str, ...]) -> None:
        if not sites:
            self.enabled = flag
            for cb in self._cbs.values():
                cb.enabled = True
            return
        for s in sites:
            self.codebook(s).enabled = flag

    # ------------------------------------------------------------------ running
    @contextmanager
    def _finite_checks(self, analysis: bool) -> Iterator[None]:
        """Whether codebooks raise on NaN/inf for the duration (see :attr:`check_finite`)."""
        prev = self._check_now
        auto = True if analysis else None  # None: each codebook's own check_finite attribute
        self._check_now = auto if self.check_finite is None else self.check_finite
        try:
            yield
        finally:
            self._check_now = prev

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model (codebooks active); same arguments as the model's forward."""
        self._ensure_hooks()
        check_tokens(args, kwargs)
        with self._finite_checks(False):
            return self.model(*args, **kwargs)

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any:
        """``model.run_with_cache``; codes are cached under ``f"{site}.hook_codes"``. NaN/inf
        activations at a codebook raise (see :attr:`check_finite`)."""
        self._ensure_hooks()
        check_tokens(args, kwargs)
        with self._finite_checks(True):
            return self.model.run_with_cache(*args, **kwargs)

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any:
        """``model.run_with_hooks``; hooks on ``f"{site}.hook_codes"`` patch codes. NaN/inf
        activations at a codebook raise (see :attr:`check_finite`)."""
        self._ensure_hooks()
        check_tokens(args, kwargs)
        with self._finite_checks(True):
            return self.model.run_with_hooks(*args, **kwargs)

    def hooks(self, *args: Any, **kwargs: Any) -> Any:
        """``model.hooks(...)`` context manager (temporary hooks, removed on exit)."""
        self._ensure_hooks()
        return self.model.hooks(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with the codebooks active."""
        self._ensure_hooks()
        return self.model.generate(*args, **kwargs)

    def reset_hooks(self, *args: Any, **kwargs: Any) -> None:
        """``model.reset_hooks``; codebook hooks survive (they are re-installed if removed)."""
        self.model.reset_hooks(*args, **kwargs)
        self._ensure_hooks()

    def to(self, *args: Any, **kwargs: Any) -> CodebookModel:
        """Move or cast the base model (through its own ``to``, which keeps TransformerLens's
        ``cfg.dtype``/``cfg.device`` in step) and the codebooks, e.g. ``cm.to(torch.bfloat16)``.

        Codebooks attached to a low-precision model keep float32 parameters (cast at use) unless
        cast this way."""
        self.model.to(*args, **kwargs)
        self._cbs.to(*args, **kwargs)
        return self

    def aux_loss(self) -> Tensor:
        """Sum of every enabled codebook's weighted reconstruction/commitment loss from the last
        forward."""
        total = next(self.model.parameters()).new_zeros(())
        for cb in self._cbs.values():
            if cb.enabled and self.enabled:
                total = total + cb.aux_loss()
        return total

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = super().__getattr__("model")
            return getattr(model, name)

    # ------------------------------------------------------------------ init / io
    @torch.no_grad()
    def init_codebooks(self, tokens: Tensor, batch_size: int = 32, max_rows: int = 65536) -> None:
        """Initialise every codebook whose ``cfg.init`` is data-driven from base-model activations
        on ``tokens`` [batch, pos] (codebooks disabled while collecting)."""
        sites = [s for s, cb in self.codebooks.items() if cb.cfg.init not in ("random", "sae")]
        if not sites:
            return
        acts: dict[str, list[Tensor]] = {s: [] for s in sites}

        def grabber(site: str):
            def grab(act: Tensor, hook: HookPoint) -> None:
                acts[site].append(act.detach().reshape(-1, *act.shape[2:]))

            return grab

        check_tokens((tokens,), {})
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise TypeError(
                f"init_codebooks: tokens must be an integer tensor [batch, pos], got "
                f"{getattr(tokens, 'shape', type(tokens).__name__)}"
            )
        with self.disabled():
            for i in range(0, tokens.shape[0], batch_size):
                self.model.run_with_hooks(
                    tokens[i : i + batch_size], fwd_hooks=[(s, grabber(s)) for s in sites]
                )
        g = torch.Generator().manual_seed(0)
        for s in sites:
            a = torch.cat(acts[s])
            if not torch.isfinite(a).all():
                raise ValueError(
                    f"activations at {s} contain NaN/inf; codes cannot be initialised from them. "
                    "Check the base model and the tokens (a diverged checkpoint, or float16 "
                    "overflow: run in bfloat16 or float32)"
                )
            if a.shape[0] > max_rows:
                a = a[torch.randperm(a.shape[0], generator=g)[:max_rows].to(a.device)]
            cb = self.codebook(s)
            init_from_activations(cb, _codebook_view(a, self._att[s].layout, cb.cfg.n_groups))

    def save(
        self, path: str | os.PathLike, include_model: bool = False, overwrite: bool = False
    ) -> None:
        """Write ``cfg.json`` and safetensors files to directory ``path`` in one atomic step
        (the layout is described in :mod:`codebook_lens.io`).

        A directory holding anything other than a CodebookModel checkpoint is refused unless
        ``overwrite=True`` (which still replaces only codebook_lens's own files)."""
        base = self.model if include_model else None
        write_codebooks(path, self.codebooks, self.backend, base, overwrite=overwrite)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module | None = None, backend: str = "auto"
    ) -> CodebookModel:
        """Rebuild a saved CodebookModel on ``model``, or on the base model saved with
        ``include_model=True``, built on ``backend`` (``"auto"``, ``"hooked"``, ``"bridge"``;
        a checkpoint from either transformer-lens generation loads on the other). Every field
        and tensor is checked before ``model`` is touched; a bad file raises
        :class:`~codebook_lens.errors.CheckpointError` naming it."""
        saved = read_codebooks(path, with_model=model is None, backend=backend)
        return cls._attach_saved(model if model is not None else saved.model, saved)

    @classmethod
    def _attach_saved(cls, model: nn.Module, saved: SavedCodebooks) -> CodebookModel:
        cm = cls(model)
        try:
            for site, cfg in saved.configs.items():
                try:
                    cb = cm.add_codebook(site, Codebook(cfg))
                except (KeyError, ValueError, TypeError) as e:
                    raise CheckpointError(f"saved codebook does not fit this model: {e}") from e
                # checked by read_codebooks; the training state is not saved with a model
                cb.load_state_dict(saved.tensors[site], strict=False)
        except BaseException:
            cm.detach()  # leave the caller's model as it was
            raise
        return cm

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | os.PathLike,
        model: nn.Module | None = None,
        backend: str = "auto",
        revision: str | None = None,
    ) -> CodebookModel:
        """:meth:`load` from a local directory or a Hugging Face Hub repo id (through
        huggingface_hub's cache; offline with ``HF_HUB_OFFLINE=1`` once cached)."""
        return cls.load(resolve_dir(repo_id_or_dir, revision), model, backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, sites={self.sites}"
