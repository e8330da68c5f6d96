"""Runtime type checker used by the test run (see ``addopts`` in pyproject.toml).

beartype with the PEP 484 numeric tower, so an ``int`` is accepted where ``float`` is annotated.
The ``__init__`` of a :class:`~codebook_lens.validation.ValidatedConfig` dataclass is left to
the config itself: it checks the same annotations in ``__post_init__``, with messages that name
the choices and the fix, which users see (no checker runs outside the tests).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from beartype import BeartypeConf, beartype

_beartype = beartype(conf=BeartypeConf(is_pep484_tower=True))


def _owner(fn: Any) -> Any:
    """The class a method named ``Class.method`` belongs to, looked up when called (it does
    not exist yet while the dataclass decorator runs)."""
    obj: Any = sys.modules.get(getattr(fn, "__module__", None) or "")
    for part in fn.__qualname__.split(".")[:-1]:
        obj = getattr(obj, part, None)
    return obj


def checker(fn: Any) -> Any:
    checked = _beartype(fn)
    if not getattr(fn, "__qualname__", "").endswith(".__init__"):
        return checked

    @functools.wraps(fn)
    def check_unless_config(*args: Any, **kwargs: Any) -> Any:
        from codebook_lens.validation import ValidatedConfig

        owner = _owner(fn)
        if isinstance(owner, type) and issubclass(owner, ValidatedConfig):
            return fn(*args, **kwargs)
        return checked(*args, **kwargs)

    return check_unless_config
