"""Type checks of config dataclasses against their annotations, at construction and on change.

A config class inherits :class:`ValidatedConfig` and puts its range and cross-field checks in
``validate()``. Every field is checked against its annotation when the object is built and
whenever a field is assigned later (``cfg.k = 10**6`` is checked again; a rejected assignment
leaves the old value in place). Wrong types raise ``TypeError``, bad values ``ValueError``, both
naming the class, the field and what to pass instead.

Rules: ``int`` fields take integers but not bools; ``float`` fields take finite ints or floats
but not bools; ``bool`` fields take only ``True``/``False``; ``str`` fields take only strings;
``X | None`` also takes None; a dataclass-typed field takes an instance of that class;
``dict[K, V]`` takes a dict whose keys are of type ``K``; ``Any`` takes anything.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from functools import cache
from typing import Any

import torch
from torch import Tensor

__all__ = ["ValidatedConfig", "check_fields", "check_tokens", "check_value", "field_types"]


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each dataclass field of ``cls`` (``Any`` where unresolvable)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # a name only imported under TYPE_CHECKING
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` has type ``tp`` under the module's rules (finiteness is separate)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin is dict:
        key_tp = (typing.get_args(tp) or (Any,))[0]
        return isinstance(value, dict) and all(_matches(k, key_tp) for k in value)
    if origin is not None:
        return isinstance(value, origin)
    if tp is type(None):
        return value is None
    return isinstance(value, tp) if isinstance(tp, type) else True


def _allows_float(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_allows_float(a) for a in typing.get_args(tp))
    return tp is float


def check_value(owner: str, name: str, value: Any, tp: Any) -> None:
    """Raise ``TypeError`` if ``value`` is not of annotation ``tp``, ``ValueError`` if it is a
    non-finite number in a float field; messages name ``owner.name``."""
    if not _matches(value, tp):
        want = _describe(tp)
        fix = "True or False" if tp is bool else f"a value of type {want}"
        if isinstance(value, bool) and tp is not bool:
            fix += " (a bool is not accepted here)"
        raise TypeError(
            f"{owner}: {name} must be {want}, got {value!r} of type {type(value).__name__}; "
            f"pass {fix}"
        )
    if _allows_float(tp) and isinstance(value, numbers.Real) and not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")


def check_fields(obj: Any) -> None:
    """Check every dataclass field of ``obj`` against its annotation (see :func:`check_value`)."""
    owner = type(obj).__name__
    for name, tp in field_types(type(obj)).items():
        check_value(owner, name, getattr(obj, name), tp)


class ValidatedConfig:
    """Mixin for dataclasses: fields are type-checked on construction and on every assignment,
    then ``validate()`` (override it for ranges and cross-field rules) runs again."""

    def validate(self) -> None:
        """Range and cross-field checks; raise ``ValueError`` naming the field and the fix."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        types_ = field_types(type(self))
        if not self.__dict__.get("_validated") or name not in types_:
            object.__setattr__(self, name, value)
            return
        check_value(type(self).__name__, name, value, types_[name])
        old = self.__dict__[name]
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except BaseException:
            object.__setattr__(self, name, old)
            raise


def check_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse model input that cannot be tokens: a Python number, or a float/bool/complex
    tensor (unless ``start_at_layer`` says it is a residual stream). ``TypeError`` names the
    argument and the fix; text and integer tensors pass, anything else is left to the model."""
    if kwargs.get("start_at_layer") is not None:
        return
    x = args[0] if args else kwargs.get("input", kwargs.get("tokens"))
    if isinstance(x, Tensor):
        if x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(
                f"input must be token ids, an integer tensor [batch, pos]; got dtype {x.dtype} "
                f"(shape {tuple(x.shape)}). Convert with tokens.long(), or pass text"
            )
    elif isinstance(x, numbers.Number):
        raise TypeError(
            f"input must be token ids (an integer tensor [batch, pos]) or text (str or list of "
            f"str), got {x!r} of type {type(x).__name__}; wrap ids as torch.tensor([[...]])"
        )
