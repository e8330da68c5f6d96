"""Close-match hints for unknown names ("did you mean ...?"), worded one way everywhere."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean", "unknown_site_error"]


def did_you_mean(name: str, known: Iterable[str], n: int = 3) -> str:
    """``" Did you mean 'a', 'b'?"`` for the up-to-``n`` entries of ``known`` closest to
    ``name``, or ``""`` when none is close; append it to an error message."""
    close = difflib.get_close_matches(str(name), list(known), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def unknown_site_error(site: str, known: Iterable[str], what: str = "codebook") -> KeyError:
    """A KeyError for ``site``, naming close matches among ``known`` and all of them."""
    known = list(known)
    return KeyError(
        f"no {what} at site {site!r}.{did_you_mean(site, known)} Available sites: {known}"
    )
