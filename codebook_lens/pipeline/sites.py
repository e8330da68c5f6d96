"""Sites by pattern: which hook points of a model get codebooks, and with which settings.

A run names its sites as groups, each a shell-style pattern over hook names (``fnmatch``:
``blocks.*.attn.hook_z``, ``blocks.[0-3].hook_mlp_out``) with the codebook fields for every site
it matches (``n_codes``, ``k``, ``similarity``, ``input_norm``, ...; ``d_in`` and ``n_groups`` are
read off each site). A pattern that matches no hook point is an error that lists the closest
names, so a typo never trains a run without the codebooks it asked for.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from codebook_lens.config import CodebookConfig
from codebook_lens.model import CodebookModel
from codebook_lens.suggest import did_you_mean
from codebook_lens.validation import ValidatedConfig

__all__ = ["SiteGroup", "match_sites", "attach_site_groups", "SITE_FIELDS"]

_READ_OFF_SITE = ("d_in", "n_groups")
SITE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(CodebookConfig) if f.name not in _READ_OFF_SITE
)
"""The :class:`~codebook_lens.CodebookConfig` fields a site group may set (all but the sizes,
which come from each matched site)."""

# Hook names that are never activations to quantize (attention patterns, our own codes hooks).
_NOT_SITES = ("hook_pattern", "hook_attn_scores", "hook_codes", "hook_tokens")


@dataclass
class SiteGroup(ValidatedConfig):
    """Codebooks at every hook point matching ``pattern``, all with the same settings."""

    pattern: str
    """Hook-name pattern, shell style (``*``, ``?``, ``[0-3]``), e.g. ``blocks.*.attn.hook_z``
    (one codebook per head at every layer, as in the paper) or ``blocks.[0-3].hook_mlp_out``."""

    n_codes: int = 10_000
    """Codes per codebook (per head at per-head sites)."""

    k: int = 8
    """Codes active per position (and per head)."""

    codebook: dict[str, Any] = field(default_factory=dict)
    """Further :class:`~codebook_lens.CodebookConfig` fields for these codebooks
    (``similarity``, ``input_norm``, ``merge_threshold``, ...). In a config file they may also
    be written next to ``pattern``."""

    def validate(self) -> None:
        """The pattern is non-empty and ``codebook`` holds valid CodebookConfig fields."""
        if not self.pattern.strip():
            raise ValueError("SiteGroup: pattern is empty; give a hook-name pattern")
        self.codebook_config(d_in=1, n_groups=1)

    def fields(self) -> dict[str, Any]:
        """Every CodebookConfig field this group sets."""
        return {**self.codebook, "n_codes": self.n_codes, "k": self.k}

    def codebook_config(self, d_in: int, n_groups: int) -> CodebookConfig:
        """The CodebookConfig of one matched site with ``d_in`` and ``n_groups``; unknown or
        size fields in :attr:`codebook` raise ``ValueError`` naming the valid ones."""
        for name in self.codebook:
            if name in ("n_codes", "k"):
                raise ValueError(
                    f"SiteGroup {self.pattern!r}: set {name} as the group's own field, not in "
                    "codebook"
                )
            if name not in SITE_FIELDS:
                raise ValueError(
                    f"SiteGroup {self.pattern!r}: unknown codebook field {name!r}."
                    f"{did_you_mean(name, SITE_FIELDS, n=1)} Valid fields are {list(SITE_FIELDS)}"
                    + (" (read off the site)" if name in _READ_OFF_SITE else "")
                )
        return CodebookConfig(d_in=d_in, n_groups=n_groups, **self.fields())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiteGroup:
        """Build from a dict; CodebookConfig fields written next to ``pattern`` (as in a TOML
        ``[[sites]]`` table) go into :attr:`codebook`."""
        own = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, Mapping):
            raise TypeError(f"SiteGroup: expected a table of fields, got {type(d).__name__}")
        flat = {k: v for k, v in d.items() if k not in own}
        rest = {k: v for k, v in d.items() if k in own}
        if flat:
            rest["codebook"] = {**dict(rest.get("codebook") or {}), **flat}
        return super().from_dict(rest)


def _closest_hooks(pattern: str, names: Sequence[str], n: int = 5) -> list[str]:
    """Hook names closest to ``pattern`` (its wildcards replaced by a layer-like ``0``)."""
    probe = re.sub(r"\[[^\]]*\]|[*?]", "0", pattern)
    close = difflib.get_close_matches(probe, names, n=n, cutoff=0.3)
    return close or list(names[:n])


def match_sites(hook_names: Sequence[str], pattern: str) -> list[str]:
    """The quantizable hook names matching ``pattern``, in layer order.

    Raises ``ValueError`` listing the closest hook names when nothing matches."""
    names = [n for n in hook_names if not n.endswith(_NOT_SITES)]
    hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        close = ", ".join(repr(n) for n in _closest_hooks(pattern, names))
        raise ValueError(
            f"site pattern {pattern!r} matches no hook point of this model; closest hook names: "
            f"{close}. Patterns are shell style (blocks.*.attn.hook_z); see cm.hook_names()"
        )
    return sorted(hits, key=_layer_order)


def _layer_order(name: str) -> tuple[Any, ...]:
    """Sort key that puts ``blocks.10`` after ``blocks.9``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def attach_site_groups(cm: CodebookModel, groups: Sequence[SiteGroup]) -> list[str]:
    """Add a codebook at every site of every group; return the sites in order.

    Names that reach the same hook point (a bridge's aliases) count once; a site claimed by two
    groups is an error naming both patterns."""
    if not groups:
        raise ValueError("no site groups; give at least one pattern, e.g. blocks.*.attn.hook_z")
    hook_dict = cm.model.hook_dict
    owner: dict[int, tuple[str, str]] = {}  # id(HookPoint) -> (site, pattern)
    plan: list[tuple[str, SiteGroup]] = []
    for g in groups:
        for site in match_sites(cm.hook_names(), g.pattern):
            key = id(hook_dict[site])
            if key in owner:
                prev_site, prev_pattern = owner[key]
                if prev_pattern != g.pattern:
                    raise ValueError(
                        f"site {site} is matched by two site groups, {prev_pattern!r} and "
                        f"{g.pattern!r}; make the patterns disjoint"
                    )
                continue
            owner[key] = (site, g.pattern)
            plan.append((site, g))
    for site, g in plan:
        cm.add_codebook(site, **g.fields())
    return [site for site, _ in plan]
