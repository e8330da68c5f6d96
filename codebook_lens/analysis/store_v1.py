"""Reading code stores of manifest format version 1 (written before shards had ids and
hashes): ``store.json`` with ``n_shards`` and full ``shapes``, shards holding ``codes.<site>``
and ``tokens``. They are read into memory, checked field by field; new saves write version 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codebook_lens.analysis.store_files import DTYPE_NAMES
from codebook_lens.analysis.store_manifest import (
    check_codes_range,
    check_tokens_range,
    dtype_name,
    is_dtype_name,
)
from codebook_lens.errors import CheckpointError
from codebook_lens.tensor_files import read_tensors

__all__ = ["read_v1"]


def _is_int(v: Any) -> bool:
    return type(v) is int


def _site_map(header: dict[str, Any], key: str, ok: Any, want: str, file: Path) -> None:
    m = header.get(key)
    if not isinstance(m, dict) or set(m) != set(header["sites"]):
        raise CheckpointError(f"{file}: {key!r} must map every site to {want}, got {m!r}")
    bad = [s for s, v in m.items() if not ok(v)]
    if bad:
        raise CheckpointError(f"{file}: {key}[{bad[0]!r}] = {m[bad[0]]!r} is not {want}")


def _check_header(header: dict[str, Any], file: Path) -> None:
    """Raise CheckpointError naming the field if ``store.json`` content is malformed."""
    sites = header.get("sites")
    if (
        not isinstance(sites, list)
        or not sites
        or not all(isinstance(s, str) for s in sites)
        or len(set(sites)) != len(sites)
    ):
        raise CheckpointError(f"{file}: 'sites' must be a non-empty list of names, got {sites!r}")
    _site_map(header, "n_codes", lambda n: _is_int(n) and n >= 1, "an integer >= 1", file)
    _site_map(header, "per_head", lambda b: isinstance(b, bool), "true or false", file)
    _site_map(
        header,
        "shapes",
        lambda sh: isinstance(sh, list) and len(sh) == 4 and all(_is_int(x) and x >= 0 for x in sh),
        "[n_seq, pos, head, k] of integers",
        file,
    )
    _site_map(header, "dtypes", is_dtype_name, f"one of {sorted(DTYPE_NAMES)}", file)
    for key, ok, want in (
        ("has_tokens", lambda b: isinstance(b, bool), "true or false"),
        ("d_vocab", lambda d: d is None or (_is_int(d) and d >= 1), "null or an integer >= 1"),
        ("n_shards", lambda n: _is_int(n) and 1 <= n <= 10**6, "an integer in [1, 10**6]"),
        ("meta", lambda m: isinstance(m, dict), "an object"),
    ):
        if key == "meta" and key not in header:
            continue
        if not ok(header.get(key)):
            raise CheckpointError(f"{file}: {key!r} must be {want}, got {header.get(key)!r}")
    for s in sites:
        if not header["per_head"][s] and header["shapes"][s][2] != 1:
            raise CheckpointError(
                f"{file}: {s} has per_head=false but {header['shapes'][s][2]} heads in 'shapes'; "
                "the header contradicts itself"
            )


def _read_shards(header: dict[str, Any], data: Path) -> tuple[dict[str, Tensor], Tensor | None]:
    parts: dict[str, list[Tensor]] = {s: [] for s in header["sites"]}
    toks: list[Tensor] = []
    for i in range(header["n_shards"]):
        f = data / f"shard-{i:05d}.safetensors"
        shard = read_tensors(f)
        for s in parts:
            key = f"codes.{s}"
            if key not in shard:
                raise CheckpointError(f"shard {f} lacks {key!r}")
            c = shard[key]
            if c.dim() != 4 or list(c.shape[1:]) != header["shapes"][s][1:]:
                raise CheckpointError(
                    f"shard {f}: {key} has shape {list(c.shape)}; store.json says "
                    f"[*, {', '.join(map(str, header['shapes'][s][1:]))}]"
                )
            parts[s].append(c)
        if header["has_tokens"]:
            if "tokens" not in shard:
                raise CheckpointError(f"shard {f} lacks 'tokens' (store.json says has_tokens)")
            toks.append(shard["tokens"])
    tokens = None
    if toks:
        if any(t.dim() != 2 or t.shape[1:] != toks[0].shape[1:] for t in toks):
            raise CheckpointError(f"the shards in {data} hold tokens of different shapes")
        tokens = torch.cat(toks)
    return {s: torch.cat(p) for s, p in parts.items()}, tokens


def read_v1(header: dict[str, Any], data: Path, file: Path) -> dict[str, Any]:
    """The fields of a version-1 store (``codes``, ``n_codes``, ``per_head``, ``tokens``,
    ``d_vocab``, ``meta``), checked; CheckpointError naming the file and field otherwise."""
    _check_header(header, file)
    codes, tokens = _read_shards(header, data)
    for s, c in codes.items():
        want, dtype = header["shapes"][s], header["dtypes"][s]
        if list(c.shape) != want or dtype_name(c) != dtype:
            raise CheckpointError(
                f"codes of {s} have shape {list(c.shape)}, dtype {c.dtype}; {file} says "
                f"{want}, {dtype}"
            )
        check_codes_range(s, c, header["n_codes"][s], file)
    if tokens is not None:
        check_tokens_range(tokens, header.get("d_vocab"), file)
    return {
        "codes": codes,
        "n_codes": dict(header["n_codes"]),
        "per_head": dict(header["per_head"]),
        "tokens": tokens,
        "d_vocab": header.get("d_vocab"),
        "meta": header.get("meta", {}),
    }
