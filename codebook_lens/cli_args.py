"""Command-line flags from config dataclasses: one flag per field, its help the field's docstring.

:func:`add_config_arguments` adds ``--name`` for every field of a config (``--train.steps``,
``--plan.placement``, ... for the fields of nested configs), typed from the annotation
(``Literal`` fields get ``choices``, ``bool`` fields ``--x/--no-x``, ``X | None`` fields also
take ``none``); :func:`config_from_args` builds the config with the flags that were given.
A flag not given leaves its field as it is, so the same flags apply on top of any starting
config (``--small``, a saved ``experiment.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from codebook_lens.validation import ValidatedConfig, field_docs, field_types, literal_choices

__all__ = [
    "CONFIG_FIELDS",
    "NONE_GIVEN",
    "add_config_arguments",
    "config_from_args",
    "replace_paths",
]

C = TypeVar("C", bound=ValidatedConfig)

CONFIG_FIELDS = "config_fields"
"""The namespace attribute listing the dotted field paths that have flags."""


class _NoneGiven:
    """``none`` on the command line for an ``X | None`` field (the parser's default ``None``
    means "not given")."""

    def __repr__(self) -> str:
        return "None"


NONE_GIVEN = _NoneGiven()
"""The parsed value of ``none`` given for an ``X | None`` field."""


def _role_text(m: re.Match[str]) -> str:
    """What Sphinx shows for ``:role:`target```: the title, or the target (its last part
    with ``~``)."""
    text = m.group(1)
    if "<" in text:
        return text.split("<")[0].strip()
    return text[1:].split(".")[-1] if text.startswith("~") else text


def _plain(doc: str) -> str:
    """A docstring as one line of terminal text: roles and double backticks dropped."""
    doc = re.sub(r":\w+:`([^`]*)`", _role_text, doc).replace("``", "")
    return " ".join(doc.split()).replace("%", "%%")


def _optional(parse: Any) -> Any:
    def parse_or_none(text: str) -> Any:
        return NONE_GIVEN if text.lower() in ("none", "null") else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")  # argparse's error message
    return parse_or_none


def _flag_kind(tp: Any) -> dict[str, Any] | None:
    """``add_argument`` keywords for annotation ``tp``; None for a field with no flag."""
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    inner = [a for a in args if a is not type(None)] if optional else [tp]
    if len(inner) != 1:
        return None
    (tp,) = inner
    choices = literal_choices(tp)
    if choices:
        kind: dict[str, Any] = {"type": type(choices[0]), "choices": list(choices)}
    elif tp is bool and not optional:
        return {"action": argparse.BooleanOptionalAction}
    elif tp in (int, float, str):
        kind = {"type": tp, "metavar": {int: "N", float: "X", str: "TEXT"}[tp]}
    else:
        return None  # dicts, Any, nested configs: handled elsewhere or not on the command line
    if optional:
        kind["type"] = _optional(kind["type"])
        if "choices" in kind:
            kind["choices"] = [*kind["choices"], NONE_GIVEN]
    return kind


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config: ValidatedConfig,
    *,
    aliases: Mapping[str, Iterable[str]] | None = None,
    exclude: Iterable[str] = (),
    prefix: str = "",
) -> list[str]:
    """Add a flag for every field of ``config`` (nested configs: ``--field.sub``), in one
    argument group per config class, with ``config``'s values as the shown defaults.

    ``aliases`` maps a dotted field path to extra option strings (``{"train.steps":
    ["--steps"]}``); ``exclude`` lists paths (or nested-config names) to leave out. The paths
    that got flags are recorded on the parser's namespace (:data:`CONFIG_FIELDS`) for
    :func:`config_from_args`, and returned."""
    aliases, exclude = dict(aliases or {}), set(exclude)
    cls = type(config)
    title = f"{cls.__name__} ({prefix.rstrip('.')})" if prefix else cls.__name__
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    group = parser.add_argument_group(title, _plain(doc))
    docs, types_ = field_docs(cls), field_types(cls)
    paths: list[str] = []
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        path, value = prefix + f.name, getattr(config, f.name)
        if path in exclude:
            continue
        if isinstance(value, ValidatedConfig):
            sub = add_config_arguments(
                parser, value, aliases=aliases, exclude=exclude, prefix=path + "."
            )
            paths += sub
            continue
        kind = _flag_kind(types_[f.name])
        if kind is None:
            continue
        flags = ["--" + path.replace("_", "-"), *aliases.get(path, ())]
        shown = value if isinstance(value, bool | int | float) or value is None else repr(value)
        help_ = f"{_plain(docs.get(f.name, ''))} (default: {shown})"
        group.add_argument(*flags, dest=path, default=None, help=help_, **kind)
        paths.append(path)
    if not prefix:
        parser.set_defaults(**{CONFIG_FIELDS: tuple(paths)})
    return paths


def replace_paths(config: C, changes: Mapping[str, Any]) -> C:
    """A copy of ``config`` with dotted-path fields changed (``{"train.steps": 5}``), each
    config validated once with all its changes."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in changes.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, sub in nested.items():
        top[head] = replace_paths(getattr(config, head), sub)
    return dataclasses.replace(config, **top) if top else config  # type: ignore[type-var]


def config_from_args(config: C, args: argparse.Namespace) -> C:
    """``config`` with the flags given on the command line (flags not given change nothing)."""
    given = {
        path: (None if value is NONE_GIVEN else value)
        for path in getattr(args, CONFIG_FIELDS, ())
        if (value := getattr(args, path, None)) is not None
    }
    return replace_paths(config, given)
