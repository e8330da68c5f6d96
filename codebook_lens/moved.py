"""Names that moved to another module keep working from the old one, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["moved_names"]


def moved_names(old: str, new_homes: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for module ``old``: ``old.<name>`` for each ``name`` in
    ``new_homes`` warns and returns ``new_homes[name].<name>``; other names raise
    AttributeError as usual. Assign it: ``__getattr__ = moved_names(__name__, {...})``."""

    def getattr_(name: str) -> Any:
        if name not in new_homes:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        home = new_homes[name]
        warnings.warn(
            f"{old}.{name} moved to {home}.{name}; import it from there (or from codebook_lens)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(home), name)

    return getattr_
