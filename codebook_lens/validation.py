"""Type checks of config dataclasses against their annotations, at construction and on change.

A config class inherits :class:`ValidatedConfig` and puts its range and cross-field checks in
``validate()``. Every field is checked against its annotation when the object is built and
whenever a field is assigned later (``cfg.k = 10**6`` is checked again; a rejected assignment
leaves the old value in place). Wrong types raise ``TypeError``, bad values ``ValueError``, both
naming the class, the field and what to pass instead.

Rules: ``int`` fields take integers but not bools; ``float`` fields take finite ints or floats
but not bools; ``bool`` fields take only ``True``/``False``; ``str`` fields take only strings;
``X | None`` also takes None; a dataclass-typed field takes an instance of that class;
``dict[K, V]`` takes a dict whose keys are of type ``K`` (a free-form ``dict[str, Any]`` takes
JSON data only: None, bools, ints, finite floats, strings, lists and dicts with string keys, so
that every config saves as JSON); ``Literal[...]`` takes one of its values (any other value of the
same type is a ``ValueError`` naming the choices and the closest one); ``Any`` takes anything.

Ranges: every ``int`` field lies in ``[-2**63, 2**64)`` (what torch and JSON readers can hold);
a class lists its own inclusive or open bounds in :attr:`ValidatedConfig.RANGES`
(``{"lr": Range(0, 10, lo_open=True)}``), checked with the types and before ``validate()``.

Also here, for every config class: :meth:`ValidatedConfig.to_dict` / :meth:`~ValidatedConfig.
from_dict` (nested configs round-trip; unknown keys are refused with the valid names),
:func:`field_docs` (the attribute docstring of each field, which the command line shows as
help).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import numbers
import textwrap
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from codebook_lens.suggest import did_you_mean

__all__ = [
    "INT_RANGE",
    "Range",
    "ValidatedConfig",
    "check_json",
    "check_range",
    "check_fields",
    "check_tokens",
    "check_value",
    "field_docs",
    "field_types",
    "literal_choices",
]

C = TypeVar("C", bound="ValidatedConfig")


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each dataclass field of ``cls`` (``Any`` where unresolvable)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # a name only imported under TYPE_CHECKING
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstring (the string literal right after the field) of each dataclass
    field of ``cls`` and its dataclass bases; ``""`` where a field has none."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (built in a REPL, frozen app)
            continue
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def literal_choices(tp: Any) -> tuple[Any, ...]:
    """The values of the ``Literal[...]`` in annotation ``tp`` (also inside ``X | None``);
    ``()`` when there is none."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(c for a in typing.get_args(tp) for c in literal_choices(a))
    return ()


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if typing.get_origin(tp) is typing.Literal:
        kinds = sorted({type(c).__name__ for c in typing.get_args(tp)})
        return f"{' or '.join(kinds)} (one of {typing.get_args(tp)})"
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
        choices = literal_choices(tp)
        if any(type(value) is type(c) for c in choices):  # the right kind, not one of them
            raise ValueError(
                f"{owner}: {name}={value!r}; choose one of {choices}."
                f"{did_you_mean(str(value), map(str, choices), n=1)}"
            )
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


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric config field: ``lo <= value <= hi`` (``None``: unbounded), with
    ``lo_open``/``hi_open`` for a strict bound."""

    lo: int | float | None = None
    """The lower bound (None: none)."""
    hi: int | float | None = None
    """The upper bound (None: none)."""
    lo_open: bool = False
    """Whether the lower bound itself is excluded."""
    hi_open: bool = False
    """Whether the upper bound itself is excluded."""
    what: str | None = None
    """How a value below the range is described (``"a positive int"``); by default
    ``">= lo"`` or ``"> lo"``."""

    def contains(self, v: int | float) -> bool:
        """Whether ``v`` lies in the range."""
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return lo_ok and hi_ok

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else _num(self.lo)
        hi = "inf" if self.hi is None else _num(self.hi)
        return f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def _num(v: int | float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(v)


def check_range(owner: str, name: str, value: Any, rng: Range) -> None:
    """``ValueError`` naming ``owner.name``, the range and ``value`` if a number lies outside."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or rng.contains(value):
        return
    if rng.lo is not None and (value <= rng.lo if rng.lo_open else value < rng.lo):
        want = rng.what or f"{'>' if rng.lo_open else '>='} {_num(rng.lo)}"
        raise ValueError(f"{owner}: {name} must be {want}, got {value!r} (the range is {rng})")
    raise ValueError(f"{owner}: {name} must lie in {rng}, got {value!r}")


_JSON_SCALARS = (str, int, float, bool, type(None))


def check_json(owner: str, name: str, value: Any, depth: int = 0) -> None:
    """Refuse anything but JSON data in a free-form field: ``TypeError`` naming ``owner``, the
    path inside the field and the offending type (``ValueError`` for a non-finite float)."""
    if depth > 64:
        raise TypeError(f"{owner}: {name} is nested deeper than 64 levels; pass JSON data")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{owner}: {name} is {value!r}; JSON data holds finite numbers only")
    if isinstance(value, _JSON_SCALARS):
        return
    if isinstance(value, list):  # not a tuple: it would come back from JSON as a list
        for i, v in enumerate(value):
            check_json(owner, f"{name}[{i}]", v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{owner}: {name} has key {k!r} of type {type(k).__name__}; JSON data has "
                    "string keys only"
                )
            check_json(owner, f"{name}[{k!r}]", v, depth + 1)
        return
    raise TypeError(
        f"{owner}: {name} holds a {type(value).__name__}, which is not JSON data (the config "
        "is saved as JSON); pass None, a bool, number, string, list or dict of those (e.g. "
        "tensor.tolist())"
    )


def _is_free_form(tp: Any) -> bool:
    """``dict[str, Any]``-like annotations, whose values the config cannot type-check."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_free_form(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    return typing.get_origin(tp) is dict and (len(args) < 2 or args[1] is Any)


def _check_field(cls: type, name: str, value: Any, tp: Any) -> None:
    """Type, JSON (free-form fields) and range checks of one field of config class ``cls``."""
    owner = cls.__name__
    check_value(owner, name, value, tp)
    if _is_free_form(tp) and isinstance(value, dict):
        for k, v in value.items():
            check_json(owner, f"{name}[{k!r}]", v)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        check_range(owner, name, value, INT_RANGE)
    rng = getattr(cls, "RANGES", {}).get(name)
    if rng is not None:
        check_range(owner, name, value, rng)


def check_fields(obj: Any) -> None:
    """Check every dataclass field of ``obj`` against its annotation (see :func:`check_value`),
    free-form fields for JSON data and numbers against the class's :attr:`~ValidatedConfig.
    RANGES` and :data:`INT_RANGE`."""
    for name, tp in field_types(type(obj)).items():
        _check_field(type(obj), name, getattr(obj, name), tp)


class ValidatedConfig:
    """Mixin for dataclasses: fields are type-checked on construction and on every assignment,
    then ``validate()`` (override it for ranges and cross-field rules) runs again.

    :meth:`to_dict` / :meth:`from_dict` convert to and from JSON-ready dicts, nested config
    fields included."""

    RANGES: ClassVar[dict[str, Range]] = {}
    """Field name -> its :class:`Range`, checked after the types and before :meth:`validate`
    (``None`` in an ``X | None`` field is not a number and passes)."""

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
        _check_field(type(self), name, value, types_[name])
        old = self.__dict__[name]
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except BaseException:
            object.__setattr__(self, name, old)
            raise

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (nested configs as dicts)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        """Build from :meth:`to_dict` output; a dict in a config-typed field becomes that config.

        An unknown key raises ``ValueError`` naming it, the class, the closest field and the valid
        fields."""
        if not isinstance(d, Mapping):
            raise TypeError(f"{cls.__name__}: expected a dict of fields, got {type(d).__name__}")
        kwargs = dict(d)
        names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            listed = ", ".join(repr(k) for k in unknown)
            raise ValueError(
                f"{cls.__name__}: unknown field{'s' if len(unknown) > 1 else ''} {listed}."
                f"{did_you_mean(unknown[0], names, n=1)} Valid fields are {sorted(names)}"
            )
        types_ = field_types(cls)
        return cls(**{k: _nested(types_[k], v) for k, v in kwargs.items()})


# Built after ValidatedConfig: the test run's type checker looks that class up on every __init__.
INT_RANGE = Range(-(2**63), 2**64, hi_open=True)
"""Where every ``int`` field of every config lies: a 64-bit integer, signed or not."""


def _nested(tp: Any, value: Any) -> Any:
    """``value`` built into the config class of annotation ``tp`` when it is a dict for one."""
    if not isinstance(value, Mapping):
        return value
    options = (
        typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    )
    for option in options:
        if isinstance(option, type) and issubclass(option, ValidatedConfig):
            return option.from_dict(value)
    return value


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
