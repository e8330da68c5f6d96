"""Evaluation: the SAE field's metrics for codebooks, per site and for all codebooks together.

:func:`evaluate_codebooks` runs held-out token batches through the base model and the
codebook model and returns an :class:`Evaluation`: next-token cross-entropy of the base model,
with the codebooks, and with the site zero- or mean-ablated in the base model; loss recovered
(SAELens's ``ce_loss_score``); KL divergence to the base model; reconstruction of the site
(explained variance, cosine, relative L2); and code usage (dead and dense codes, entropy and the
effective number of codes, L0, empty slots). docs/evaluation.md gives every formula.

Everything streams: per batch, one forward per condition, and only sums are kept between
batches (no activations or logits). Ablation hooks go through ``run_with_hooks``, so they work on
HookedTransformer and TransformerBridge alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from codebook_lens.model import CodebookModel
from codebook_lens.quantizer import Codebook

__all__ = ["Evaluation", "evaluate_codebooks", "dense_metric_name", "TABLE_METRICS", "ALL"]

ALL = "all"
"""The name of the all-codebooks-together entry in tables and in :meth:`Evaluation.flat`."""

TABLE_METRICS = (
    "loss_recovered_zero",
    "loss_recovered_mean",
    "kl_to_base",
    "ce_delta",
    "explained_variance",
    "cosine",
    "rel_l2",
    "dead_frac",
    "dense_frac_1pct",
    "effective_codes",
    "empty_slot_rate",
)
"""The columns of :meth:`Evaluation.rows` by default."""

_ABLATIONS = ("zero", "mean")


def dense_metric_name(threshold: float) -> str:
    """The metric name for the share of codes firing at more than ``threshold`` of positions:
    ``dense_frac_1pct`` for 0.01, ``dense_frac_10pct`` for 0.1, ``dense_frac_0.5pct`` for 0.005."""
    return f"dense_frac_{threshold * 100:g}pct"


# ---------------------------------------------------------------------------- the result
@dataclass
class Evaluation:
    """The metrics of one evaluation (see docs/evaluation.md for each formula).

    ``n_tokens`` tokens were evaluated; ``all`` holds the metrics of all evaluated codebooks
    together, ``sites`` those of each codebook alone (the others disabled), by site. Metric
    values are floats; a ratio whose denominator is zero (e.g. loss recovered when ablating
    changes nothing) is NaN.
    """

    n_tokens: int
    all: dict[str, float]
    sites: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN and inf become None, as JSON has no such numbers)."""
        return {
            "n_tokens": self.n_tokens,
            "all": _json_metrics(self.all),
            "sites": {s: _json_metrics(m) for s, m in self.sites.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        """The inverse of :meth:`to_dict` (None reads back as NaN)."""
        missing = [k for k in ("n_tokens", "all", "sites") if k not in d]
        if missing:
            raise ValueError(
                f"not an evaluation: missing key(s) {missing}; expected a dict written by "
                "Evaluation.to_dict() with keys 'n_tokens', 'all' and 'sites'"
            )
        return cls(
            n_tokens=int(d["n_tokens"]),
            all=_float_metrics(d["all"]),
            sites={str(s): _float_metrics(m) for s, m in d["sites"].items()},
        )

    def flat(self) -> dict[str, float]:
        """``{"all/<metric>": v, "<site>/<metric>": v, ...}``: what ``train_codebooks``'s
        ``eval_fn`` can return for logging."""
        out = {f"{ALL}/{k}": v for k, v in self.all.items()}
        for site, metrics in self.sites.items():
            out.update({f"{site}/{k}": v for k, v in metrics.items()})
        return out

    def header(self, metrics: Sequence[str] = TABLE_METRICS) -> tuple[str, ...]:
        """The header of :meth:`rows`: ``("site", *metrics)``."""
        return ("site", *metrics)

    def rows(self, metrics: Sequence[str] = TABLE_METRICS) -> list[tuple[str, ...]]:
        """One row of formatted values per site, then one for ``"all"`` (a metric not in the
        evaluation shows as ``-``)."""
        entries = [*self.sites.items(), (ALL, self.all)]
        return [(name, *(_fmt(m.get(k)) for k in metrics)) for name, m in entries]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _json_metrics(m: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(v) else None) for k, v in m.items()}


def _float_metrics(m: dict[str, Any]) -> dict[str, float]:
    return {str(k): (math.nan if v is None else float(v)) for k, v in m.items()}


# ---------------------------------------------------------------------------- streaming sums
class _Recon:
    """Streaming sums for explained variance, cosine and relative L2 of one codebook.

    The variance term uses Chan et al.'s pairwise update of (mean, sum of squared deviations)
    per unit (head or group) and dim, in float64: a one-pass ``sum(a^2) - n mean^2`` would
    cancel catastrophically on sites with large means (the residual stream)."""

    def __init__(self) -> None:
        self.n = 0  # positions
        self.vectors = 0  # positions x units
        self.mean: Tensor | None = None  # [units, d] float64
        self.m2: Tensor | None = None  # [units, d] float64
        self.err: Tensor | float = 0.0  # sum ||a - a_hat||^2
        self.cos: Tensor | float = 0.0  # sum cos(a, a_hat)
        self.rel: Tensor | float = 0.0  # sum ||a - a_hat|| / ||a|| over a != 0
        self.rel_n: Tensor | int = 0  # vectors with a != 0

    def add(self, a: Float[Tensor, "b p ..."], a_hat: Float[Tensor, "b p ..."]) -> None:
        a = a.float().reshape(a.shape[0] * a.shape[1], -1, a.shape[-1])  # [positions, units, d]
        a_hat = a_hat.float().reshape(a.shape)
        n_b = a.shape[0]
        mean_b = a.sum(0, dtype=torch.float64) / n_b
        m2_b = (a - mean_b.float()).pow(2).sum(0, dtype=torch.float64)
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = mean_b, m2_b
        else:
            total = self.n + n_b
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (n_b / total)
            self.m2 = self.m2 + m2_b + delta.pow(2) * (self.n * n_b / total)
        self.n += n_b
        self.vectors += a.shape[0] * a.shape[1]
        diff = a - a_hat
        self.err = self.err + diff.pow(2).sum(dtype=torch.float64)
        self.cos = self.cos + F.cosine_similarity(a, a_hat, dim=-1).sum(dtype=torch.float64)
        norm = a.norm(dim=-1)
        nonzero = norm > 0
        rel = torch.where(nonzero, diff.norm(dim=-1) / norm.where(nonzero, 1.0), 0.0)
        self.rel = self.rel + rel.sum(dtype=torch.float64)
        self.rel_n = self.rel_n + nonzero.sum()

    def explained_variance(self) -> float:
        total = float(self.m2.sum()) if self.m2 is not None else 0.0
        return 1.0 - float(self.err) / total if total > 0 else math.nan


def _pooled_recon(parts: list[_Recon]) -> dict[str, float]:
    """Reconstruction metrics over one or several codebooks: explained variance as the
    vector-weighted mean of each codebook's, cosine and relative L2 as means over all vectors."""
    vectors = sum(r.vectors for r in parts)
    rel_n = int(sum(r.rel_n for r in parts))
    return {
        "explained_variance": sum(r.explained_variance() * r.vectors for r in parts) / vectors,
        "cosine": float(sum(r.cos for r in parts)) / vectors,
        "rel_l2": float(sum(r.rel for r in parts)) / rel_n if rel_n else math.nan,
    }


class _Usage:
    """Streaming code counts of one codebook: each code once per position (and group)."""

    def __init__(self, cb: Codebook, device: torch.device) -> None:
        self.n_groups, self.n_codes = cb.cfg.n_groups, cb.cfg.n_codes
        self.counts = torch.zeros(self.n_groups * self.n_codes, dtype=torch.long, device=device)
        self.rows = 0  # quantized vectors per group
        self.slots = 0
        self.empty: Tensor | int = 0

    def add(self, codes: Int[Tensor, "... slots"]) -> None:
        g = self.n_groups
        flat = codes.reshape(-1, g, codes.shape[-1]).long()
        self.rows += flat.shape[0]
        self.slots += flat.numel()
        self.empty = self.empty + (flat < 0).sum()
        # dedupe within a position: after sorting, a repeat of the previous slot is not counted
        s = flat.sort(dim=-1).values
        keep = s >= 0
        keep[..., 1:] &= s[..., 1:] != s[..., :-1]
        offs = torch.arange(g, device=s.device).view(1, g, 1) * self.n_codes
        self.counts += torch.bincount((s + offs)[keep], minlength=g * self.n_codes)

    def entropies(self) -> Tensor:
        """Entropy (nats) of the code-usage distribution of each group (0 for an unused one)."""
        c = self.counts.view(self.n_groups, self.n_codes).double()
        p = c / c.sum(-1, keepdim=True).clamp_min(1.0)
        return -(p * p.where(p > 0, 1.0).log()).sum(-1)


def _pooled_usage(parts: list[_Usage], thresholds: tuple[float, ...]) -> dict[str, float]:
    """Usage metrics over one or several codebooks, every code, group and slot counted once."""
    codes = sum(u.counts.numel() for u in parts)
    out = {"dead_frac": float(sum((u.counts == 0).sum() for u in parts)) / codes}
    for t in thresholds:
        dense = sum((u.counts.double() / u.rows > t).sum() for u in parts)
        out[dense_metric_name(t)] = float(dense) / codes
    entropy = float(torch.cat([u.entropies() for u in parts]).mean())
    out["usage_entropy"] = entropy
    out["effective_codes"] = math.exp(entropy)
    fired = sum(u.counts.sum() for u in parts)
    out["l0"] = float(fired) / sum(u.rows * u.n_groups for u in parts)
    out["empty_slot_rate"] = float(sum(u.empty for u in parts)) / sum(u.slots for u in parts)
    return out


class _SiteStats:
    """Reconstruction and usage sums of one codebook in one condition."""

    def __init__(self, cb: Codebook, device: torch.device) -> None:
        self.recon = _Recon()
        self.usage = _Usage(cb, device)

    def add(self, cb: Codebook, x: Tensor, out: Tensor, codes: Tensor) -> None:
        # the codes' own space: with input_norm the codebook reconstructs (and the model
        # receives) the normalised activation, so that is what a_hat is compared with
        a = cb.normalize_input(x)
        # with use_error_term the module returns x (+ any patch delta); a_hat is its own output
        a_hat = cb.decode(codes).to(x.dtype) if cb.cfg.use_error_term else out
        self.recon.add(a, a_hat)
        self.usage.add(codes)


# ---------------------------------------------------------------------------- setup
@dataclass
class _Run:
    """What one evaluation works on, checked."""

    cm: CodebookModel
    batches: list[Tensor]
    base: nn.Module | None
    sites: list[str]
    thresholds: tuple[float, ...]
    device: torch.device
    base_device: torch.device

    def conditions(self) -> list[tuple[str, list[str]]]:
        """(entry, codebooks on): each site alone, then all together (one site: the same)."""
        alone = [(s, [s]) for s in self.sites]
        return alone if len(self.sites) == 1 else [*alone, (ALL, list(self.sites))]


def _check_sites(cm: CodebookModel, sites: Sequence[str] | None) -> list[str]:
    if isinstance(sites, str):
        raise TypeError(
            f"sites must be a list of site names, got the string {sites!r}; pass sites=[{sites!r}]"
        )
    out = list(dict.fromkeys(cm.sites if sites is None else sites))
    for s in out:
        cm.codebook(s)  # the unknown-site KeyError with close matches
    if not out:
        raise ValueError(
            "no codebooks to evaluate: attach one with cm.add_codebook(...) or "
            "pass sites=[...] naming some of cm.sites"
        )
    return out


def _check_batches(batches: Iterable[Tensor]) -> list[Tensor]:
    if isinstance(batches, Tensor):
        raise TypeError(
            f"batches must be an iterable of token batches [batch, pos], got one tensor of shape "
            f"{tuple(batches.shape)}; pass list(tokens.split(batch_size))"
        )
    out = list(batches)
    if not out:
        raise ValueError(
            "batches is empty; evaluate_codebooks needs at least one batch of "
            "held-out tokens [batch, pos]"
        )
    for i, t in enumerate(out):
        is_int = isinstance(t, Tensor) and not (
            t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool
        )
        if not is_int or t.dim() != 2:
            what = f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, Tensor) else t
            raise TypeError(
                f"batch {i} must be token ids, an integer tensor [batch, pos]; got "
                f"{what!r}. Convert with tokens.long() / tokens.reshape(-1, pos)"
            )
        if t.shape[0] == 0 or t.shape[1] < 2:
            raise ValueError(
                f"batch {i} has shape {tuple(t.shape)}; each batch needs at least "
                "one sequence of at least 2 tokens (one predicted position)"
            )
    return out


def _check_base(cm: CodebookModel, base: nn.Module | None, sites: list[str]) -> nn.Module | None:
    if base is None or base is cm.model:
        return None
    if isinstance(base, CodebookModel):
        raise TypeError(
            "base_model must be the bare TransformerLens model, got a CodebookModel; "
            "pass its .detach() result, or base_model=None to use cm with its "
            "codebooks disabled"
        )
    hook_dict = getattr(base, "hook_dict", None)
    if hook_dict is None or not hasattr(base, "run_with_hooks"):
        raise TypeError(
            f"base_model must be a TransformerLens model (HookedTransformer or "
            f"TransformerBridge), got {type(base).__name__}"
        )
    taken = sorted(n for n in hook_dict if n.endswith(".hook_codes"))
    if taken:
        raise ValueError(
            f"base_model has codebooks attached (codes hooks {taken}), so it is "
            "not the base model; pass the model before attaching, or None"
        )
    missing = [s for s in sites if s not in hook_dict]
    if missing:
        raise ValueError(
            f"base_model has no hook point(s) {missing}; pass the model cm was "
            "built from (same architecture), or None"
        )
    return base


def _check_thresholds(thresholds: tuple[float, ...]) -> tuple[float, ...]:
    for t in thresholds:
        if not 0 < t < 1:
            raise ValueError(
                f"dense_thresholds must lie in (0, 1) (shares of positions, e.g. "
                f"0.01 for 1%), got {t!r}"
            )
    return tuple(dict.fromkeys(thresholds))


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def _eval_state(cm: CodebookModel, base: nn.Module | None) -> Iterator[None]:
    """Eval mode (no usage counting, no dropout) and every codebook enabled for the duration;
    each module's mode and every enabled flag come back afterwards, even on errors."""
    modules = [*cm.modules(), *(base.modules() if base is not None else ())]
    modes = [m.training for m in modules]
    enabled, flags = cm.enabled, {s: cb.enabled for s, cb in cm.codebooks.items()}
    try:
        cm.eval()
        if base is not None:
            base.eval()
        cm.enabled = True
        for cb in cm.codebooks.values():
            cb.enabled = True
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
        cm.enabled = enabled
        for s, flag in flags.items():
            cm.codebook(s).enabled = flag


# ---------------------------------------------------------------------------- forwards
_Hook = tuple[str, Callable[..., Any]]


def _base_logits(run: _Run, tokens: Tensor, hooks: list[_Hook]) -> Tensor:
    """Logits of the base model (or of cm with every codebook off) with ``hooks``."""
    if run.base is None:
        with run.cm.disabled():
            return run.cm.run_with_hooks(tokens, fwd_hooks=hooks)
    logits = run.base.run_with_hooks(tokens.to(run.base_device), fwd_hooks=hooks)
    return logits.to(run.device)


def _codebook_logits(
    run: _Run, tokens: Tensor, on: list[str], stats: dict[str, _SiteStats]
) -> Tensor:
    """Logits of cm with only the codebooks ``on`` enabled; each one's input, output and codes
    go into ``stats`` as they pass (the codes as the model used them, after any patch)."""
    cm, codes = run.cm, {}

    # Plain torch hooks on the codebook's own modules, not TransformerLens hooks: a TL hook on
    # hook_codes would mark the codes as patched (a copy, a check with a host sync and a second
    # decode per forward). Registered last, they see the codes after any user patch hook.
    def grab(site: str) -> Callable[..., None]:
        def fwd_hook(hp: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            codes[site] = out

        return fwd_hook

    def measure(site: str) -> Callable[..., None]:
        def fwd_hook(cb: Codebook, args: tuple[Any, ...], out: Tensor) -> None:
            stats[site].add(cb, args[0], out, codes.pop(site))

        return fwd_hook

    handles = []
    for s in on:
        cb = cm.codebook(s)
        handles += [cb.hook_codes.register_forward_hook(grab(s))]
        handles += [cb.register_forward_hook(measure(s))]
    others = [s for s in cm.sites if s not in on]
    try:
        with cm.disabled(*others) if others else nullcontext():
            return cm.run_with_hooks(tokens)
    finally:
        for h in handles:
            h.remove()


def _ablation_hook(kind: str, mean: Tensor) -> Callable[..., Tensor]:
    def ablate(act: Tensor, hook: Any) -> Tensor:
        out = torch.zeros_like(act)
        return out if kind == "zero" else out + mean.to(act)

    return ablate


def _site_means(run: _Run, progress: bool) -> dict[str, Tensor]:
    """Mean activation of each site in the base model over all evaluated positions, per
    feature (and head), in float64: the first pass."""
    sums: dict[str, Tensor] = {}

    def adder(site: str) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            s = act.sum((0, 1), dtype=torch.float64)
            sums[site] = sums[site] + s if site in sums else s

        return hook

    n = 0
    for tokens in tqdm(run.batches, desc="evaluate: site means", disable=not progress):
        _base_logits(run, tokens.to(run.device), [(s, adder(s)) for s in run.sites])
        n += tokens.shape[0] * tokens.shape[1]
    return {s: v / n for s, v in sums.items()}


# ---------------------------------------------------------------------------- metrics
def _log_probs(logits: Float[Tensor, "b p vocab"]) -> Float[Tensor, "b p_1 vocab"]:
    """Next-token log-probabilities at every predicted position (all but the last), float32."""
    return logits[:, :-1].float().log_softmax(-1)


def _ce_sum(lp: Tensor, tokens: Tensor) -> Tensor:
    return -lp.gather(-1, tokens[:, 1:, None].to(lp.device)).sum(dtype=torch.float64)


def _kl_sum(lp_base: Tensor, lp: Tensor) -> Tensor:
    if lp.shape != lp_base.shape:
        raise ValueError(
            f"the base model's logits have shape {tuple(lp_base.shape)} where cm's "
            f"have {tuple(lp.shape)}; base_model must share cm's vocabulary"
        )
    return (lp_base.exp() * (lp_base - lp)).sum(dtype=torch.float64)


class _Totals:
    """Every sum of one evaluation, keyed by entry (a site, or ``"all"``) and condition."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.n_tokens = 0
        self.n_pred = 0
        self.ce: dict[tuple[str, str], Tensor] = {}
        self.kl: dict[str, Tensor] = {}
        self.stats = {
            entry: {s: _SiteStats(run.cm.codebook(s), run.device) for s in on}
            for entry, on in run.conditions()
        }

    def add_ce(self, key: tuple[str, str], lp: Tensor, tokens: Tensor) -> None:
        s = _ce_sum(lp, tokens)
        self.ce[key] = self.ce[key] + s if key in self.ce else s

    def add_batch(self, tokens: Tensor, means: dict[str, Tensor]) -> None:
        """Every condition's forward on one batch."""
        run = self.run
        lp_base = _log_probs(_base_logits(run, tokens, []))
        self.add_ce(("base", "base"), lp_base, tokens)
        for entry, on in run.conditions():
            lp = _log_probs(_codebook_logits(run, tokens, on, self.stats[entry]))
            self.add_ce((entry, "codebook"), lp, tokens)
            kl = _kl_sum(lp_base, lp)
            self.kl[entry] = self.kl[entry] + kl if entry in self.kl else kl
            del lp
            for kind in _ABLATIONS:
                hooks = [(s, _ablation_hook(kind, means[s])) for s in on]
                self.add_ce((entry, kind), _log_probs(_base_logits(run, tokens, hooks)), tokens)
        self.n_tokens += tokens.numel()
        self.n_pred += tokens.shape[0] * (tokens.shape[1] - 1)

    def metrics(self, entry: str) -> dict[str, float]:
        ce = {k: float(self.ce[k]) / self.n_pred for k in self.ce if k[0] in (entry, "base")}
        base, cb = ce[("base", "base")], ce[(entry, "codebook")]
        zero, mean = ce[(entry, "zero")], ce[(entry, "mean")]
        out = {
            "ce_base": base,
            "ce_codebook": cb,
            "ce_zero_ablation": zero,
            "ce_mean_ablation": mean,
            "ce_delta": cb - base,
            "loss_recovered_zero": _recovered(zero, cb, base),
            "loss_recovered_mean": _recovered(mean, cb, base),
            "kl_to_base": float(self.kl[entry]) / self.n_pred,
        }
        parts = list(self.stats[entry].values())
        out.update(_pooled_recon([p.recon for p in parts]))
        out.update(_pooled_usage([p.usage for p in parts], self.run.thresholds))
        return out

    def result(self) -> Evaluation:
        sites = {s: self.metrics(s) for s in self.run.sites}
        every = self.metrics(ALL) if len(self.run.sites) > 1 else dict(sites[self.run.sites[0]])
        return Evaluation(n_tokens=self.n_tokens, all=every, sites=sites)


def _recovered(ablated: float, codebook: float, base: float) -> float:
    """SAELens's loss recovered (``ce_loss_score``); NaN when ablating changes nothing."""
    gap = ablated - base
    return (ablated - codebook) / gap if gap != 0 else math.nan


# ---------------------------------------------------------------------------- entry point
@torch.no_grad()
def evaluate_codebooks(
    cm: CodebookModel,
    batches: Iterable[Int[Tensor, "_batch _pos"]],  # shapes may differ between batches
    base_model: nn.Module | None = None,
    sites: Sequence[str] | None = None,
    dense_thresholds: tuple[float, ...] = (0.01, 0.1),
    progress: bool = False,
) -> Evaluation:
    """The SAE field's metrics for ``cm``'s codebooks on held-out token ``batches``.

    ``batches``: token tensors ``[batch, pos]`` (kept as a list: they are read twice, once for
    the sites' mean activations and once for the metrics). ``base_model``: the original
    TransformerLens model (e.g. before the model was finetuned with its codebooks); None uses
    cm with every codebook disabled. ``sites``: the codebooks to evaluate (default all of
    ``cm.sites``); ``"all"`` means these together, the others disabled. ``dense_thresholds``:
    shares of positions above which a code counts as dense (one metric each).

    Per site (that codebook alone) and for all together: ``ce_base``, ``ce_codebook``,
    ``ce_zero_ablation``, ``ce_mean_ablation`` (the site(s) ablated in the base model),
    ``ce_delta``, ``loss_recovered_zero``/``_mean``, ``kl_to_base``; ``explained_variance``,
    ``cosine``, ``rel_l2`` of the codebook's output against its (normalised) input; and
    ``dead_frac``, ``dense_frac_*``, ``usage_entropy``, ``effective_codes``, ``l0``,
    ``empty_slot_rate``. Formulas: docs/evaluation.md.

    cm's enabled flags and train/eval modes are restored afterwards, also on errors; usage
    counters (``code_counts``) are not touched. Raises ``ValueError`` for empty ``batches``
    and ``KeyError`` (naming close matches) for a site without a codebook.
    """
    sites_ = _check_sites(cm, sites)
    base = _check_base(cm, base_model, sites_)
    run = _Run(
        cm=cm,
        batches=_check_batches(batches),
        base=base,
        sites=sites_,
        thresholds=_check_thresholds(dense_thresholds),
        device=_device(cm.model),
        base_device=_device(base) if base is not None else _device(cm.model),
    )
    with _eval_state(cm, base):
        means = _site_means(run, progress)
        totals = _Totals(run)
        for tokens in tqdm(run.batches, desc="evaluate", disable=not progress):
            totals.add_batch(tokens.to(run.device), means)
        return totals.result()
