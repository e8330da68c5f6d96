"""Griffe extension for the docs site: the package's docstrings name objects with Sphinx roles
(``:func:`show```, ``:class:`~codebook_lens.viz.offline.View```), which Markdown would print
as text. Each role becomes the code span Sphinx would display, linked to the object's entry in
the API reference when the site has one (an optional cross-reference: no link, no warning,
when the object is not rendered, e.g. a private helper)."""

from __future__ import annotations

import re
from typing import Any

import griffe

__all__ = ["SphinxRoles", "link_roles"]

ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj|exc):`([^`]+)`")


def _target(obj: griffe.Object, name: str) -> str | None:
    """The full path of ``name`` as written in ``obj``'s docstring, or None."""
    if name.startswith("codebook_lens"):
        return name
    head, _, rest = name.partition(".")
    try:
        resolved = obj.resolve(head)
    except (griffe.NameResolutionError, ValueError):
        return None
    if not resolved.startswith("codebook_lens"):
        return None  # torch.Tensor and the like
    return f"{resolved}.{rest}" if rest else resolved


def link_roles(obj: griffe.Object, text: str) -> str:
    """``text`` with every Sphinx role replaced by what it displays, linked where possible."""

    def one(m: re.Match[str]) -> str:
        role = m.group(1)
        if titled := re.fullmatch(r"(.+?)\s*<([^>]+)>", role):
            shown, name = titled.group(1), titled.group(2)
        else:
            name = role.lstrip("~")
            shown = name.rsplit(".", 1)[-1] if role.startswith("~") else name
        target = _target(obj, name)
        code = f"<code>{shown}</code>"
        return f'<autoref identifier="{target}" optional>{code}</autoref>' if target else code

    return ROLE.sub(one, text)


def _objects(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


class SphinxRoles(griffe.Extension):
    """Rewrites the Sphinx roles of every docstring of a package once it is loaded (names
    resolve only then)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite the roles in the docstrings of ``pkg`` and everything it defines."""
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = link_roles(obj, obj.docstring.value)
