"""Griffe extension for the docs site: the package's docstrings name objects with Sphinx roles
(``:func:`show```, ``:class:`~codebook_lens.viz.offline.View```), which Markdown would print
as text. Each role becomes a code span with the name the role would display."""

from __future__ import annotations

import re
from typing import Any

import griffe

__all__ = ["SphinxRoles", "plain_roles"]

ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj|exc):`([^`]+)`")


def _shown(target: str) -> str:
    """The text Sphinx shows for a role's target: ``title <target>`` shows the title, ``~a.b``
    the last part."""
    if m := re.fullmatch(r"(.+?)\s*<[^>]+>", target):
        return m.group(1)
    return target.rsplit(".", 1)[-1] if target.startswith("~") else target


def plain_roles(text: str) -> str:
    """``text`` with every Sphinx role replaced by a code span of what it displays."""
    return ROLE.sub(lambda m: f"`{_shown(m.group(1))}`", text)


class SphinxRoles(griffe.Extension):
    """Rewrites the Sphinx roles of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(obj.docstring.value)
