"""The manifest of a code store on disk (``store.json``, format version 2) and the checks that
tie it to its shard files.

A store directory (see :mod:`codebook_lens.atomic` for the versioned layout)::

    PATH/store.json                    the manifest, replaced atomically after every shard
    PATH/v-store-<hex>/shard-NNNNN.safetensors
                                       codes.<site> [n, pos, head, k] (smallest int dtype),
                                       tokens [n, pos] (if kept), counts.<site> [head, n_codes]
                                       (int64: how many positions each code fires at in the
                                       shard, one count per position); metadata: format,
                                       store_id, shard index, n_seq
    PATH/v-store-<hex>/counts.safetensors
                                       counts.<site> summed over all shards (complete stores)

The manifest records per shard its index, file, ``n_seq``, byte size and SHA-256; the store id
(a uuid, also in every shard's metadata); the dtypes, shapes and expected key set of every
shard; whether the collection is complete; and the collection settings a resume must match.
Every open checks the structure (files present, none extra, sizes, store id, index, keys,
shapes, dtypes: reading only the headers); the content hashes are checked on request
(``verify=True``) and by ``CodeStore.load``, which reads every byte anyway.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from codebook_lens.analysis.store_files import (
    COUNTS_FILE,
    DTYPE_NAMES,
    STORE_FORMAT,
    ShardFile,
    file_sha256,
    shard_index,
    shard_name,
)
from codebook_lens.atomic import DirKind
from codebook_lens.errors import CheckpointError

__all__ = [
    "STORE_FORMAT",
    "STORE_VERSION",
    "STORE_KIND",
    "COUNTS_FILE",
    "expected_keys",
    "check_manifest",
    "check_shards",
    "check_counts_file",
    "verify_hashes",
    "settings_mismatch",
    "check_codes_range",
    "check_tokens_range",
    "dtype_name",
    "is_dtype_name",
    "new_manifest",
    "with_shards",
]

STORE_VERSION = 2
"""The manifest format version written and read."""
STORE_KIND = DirKind(
    name="CodeStore",
    head="store.json",
    format=STORE_FORMAT,
    tag="store",
    saver="CodeStore.save or collect_codes(..., out=PATH)",
)
"""The on-disk kind of a code store (for :mod:`codebook_lens.atomic`)."""

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIX = "restore the file from a copy of the store, or collect the store again"


def dtype_name(t: Tensor) -> str:
    """``"int16"`` for an int16 tensor."""
    return str(t.dtype).removeprefix("torch.")


def is_dtype_name(v: Any) -> bool:
    """Whether ``v`` names a dtype a store file may hold (``"int16"``)."""
    return isinstance(v, str) and v in DTYPE_NAMES


def expected_keys(sites: list[str], has_tokens: bool) -> list[str]:
    """The tensor names every shard of a store holds, sorted."""
    keys = [f"codes.{s}" for s in sites] + [f"counts.{s}" for s in sites]
    return sorted(keys + (["tokens"] if has_tokens else []))


def _is_int(v: Any, lo: int = 0) -> bool:
    return type(v) is int and v >= lo


def _need(ok: bool, file: Path, what: str) -> None:
    if not ok:
        raise CheckpointError(f"{file}: {what}; the manifest is corrupt or was edited")


def _site_map(m: dict[str, Any], key: str, ok: Any, want: str, file: Path) -> None:
    v = m.get(key)
    _need(
        isinstance(v, dict) and set(v) == set(m["sites"]),
        file,
        f"{key!r} must map every site to {want}",
    )
    bad = [s for s, x in v.items() if not ok(x)]
    _need(not bad, file, f"{key}[{bad[0]!r}] = {v[bad[0]]!r:.80} is not {want}" if bad else "")


def _check_sites(m: dict[str, Any], file: Path) -> None:
    sites = m.get("sites")
    _need(
        isinstance(sites, list)
        and bool(sites)
        and all(isinstance(s, str) for s in sites)
        and len(set(sites)) == len(sites),
        file,
        f"'sites' must be a non-empty list of names, got {sites!r:.80}",
    )
    _site_map(m, "n_codes", lambda n: _is_int(n, 1), "an integer >= 1", file)
    _site_map(m, "per_head", lambda b: isinstance(b, bool), "true or false", file)
    _site_map(m, "dtypes", is_dtype_name, f"one of {sorted(DTYPE_NAMES)}", file)
    _site_map(
        m,
        "shapes",
        lambda sh: isinstance(sh, list) and len(sh) == 4 and all(_is_int(x) for x in sh),
        "[n_seq, pos, head, k] of integers",
        file,
    )
    for s in sites:
        n, p, h, _k = m["shapes"][s]
        _need(n == m["n_seq"] and p == m["seq_len"], file, f"shapes[{s!r}] disagrees with n_seq")
        if not m["per_head"][s] and h != 1:
            raise CheckpointError(
                f"{file}: {s} has per_head=false but {h} heads in 'shapes'; the manifest "
                "contradicts itself"
            )


def _check_scalars(m: dict[str, Any], file: Path) -> None:
    _need(
        isinstance(m.get("store_id"), str) and bool(_HEX32.fullmatch(m["store_id"])),
        file,
        "'store_id' must be 32 hex digits",
    )
    for key, lo in (("n_seq", 0), ("seq_len", 1), ("shard_seqs", 1)):
        _need(_is_int(m.get(key), lo), file, f"{key!r} must be an integer >= {lo}")
    for key in ("has_tokens", "complete"):
        _need(isinstance(m.get(key), bool), file, f"{key!r} must be true or false")
    d = m.get("d_vocab")
    _need(d is None or _is_int(d, 1), file, "'d_vocab' must be null or an integer >= 1")
    td = m.get("token_dtype")
    want_td = is_dtype_name(td) if m["has_tokens"] else td is None
    _need(want_td, file, f"'token_dtype' = {td!r:.40} does not fit has_tokens={m['has_tokens']}")
    _need(isinstance(m.get("meta", {}), dict), file, "'meta' must be an object")
    c = m.get("collect")
    _need(c is None or isinstance(c, dict), file, "'collect' must be null or an object")


def _check_shard_list(m: dict[str, Any], file: Path) -> None:
    shards = m.get("shards")
    _need(isinstance(shards, list), file, "'shards' must be a list")
    keys = {"file", "index", "n_seq", "bytes", "sha256"}
    for i, r in enumerate(shards):
        _need(isinstance(r, dict) and set(r) == keys, file, f"shards[{i}] must have {keys}")
        _need(r["index"] == i and r["file"] == shard_name(i), file, f"shards[{i}] is out of order")
        _need(_is_int(r["n_seq"], 1) and r["n_seq"] <= m["shard_seqs"], file, f"shards[{i}].n_seq")
        _need(_is_int(r["bytes"], 9), file, f"shards[{i}].bytes must be an integer")
        ok = isinstance(r["sha256"], str) and _HEX64.fullmatch(r["sha256"])
        _need(bool(ok), file, f"shards[{i}].sha256 must be 64 hex digits")
        last = i == len(shards) - 1
        _need(last or r["n_seq"] == m["shard_seqs"], file, f"shards[{i}] is short but not last")
    _need(sum(r["n_seq"] for r in shards) == m["n_seq"], file, "'n_seq' != the shards' total")
    _need(m.get("n_shards") == len(shards), file, "'n_shards' != the number of shards listed")
    c = m.get("counts")
    ok = c is None or (
        isinstance(c, dict)
        and set(c) == {"file", "bytes", "sha256"}
        and c["file"] == COUNTS_FILE
        and _is_int(c["bytes"], 9)
        and isinstance(c["sha256"], str)
        and bool(_HEX64.fullmatch(c["sha256"]))
    )
    _need(ok, file, "'counts' must be null or {file, bytes, sha256}")
    _need(not m["complete"] or c is not None, file, "a complete store records its counts file")


def new_manifest(
    settings: dict[str, Any], store_id: str, meta: dict[str, Any], collect: dict[str, Any] | None
) -> dict[str, Any]:
    """The manifest of an empty, incomplete store with layout ``settings`` (sites, n_codes,
    per_head, dtypes, shapes, seq_len, has_tokens, token_dtype, d_vocab, shard_seqs)."""
    keys = expected_keys(list(settings["sites"]), settings["has_tokens"])
    m = {"format": STORE_FORMAT, "version": STORE_VERSION, "store_id": store_id}
    m.update({k: v for k, v in settings.items() if k != "data"})
    m.update({"n_seq": 0, "complete": False, "keys": keys, "shards": [], "n_shards": 0})
    m["counts"] = None
    m.update({"collect": collect, "meta": meta})
    return m


def with_shards(
    m: dict[str, Any], shards: list[dict[str, Any]], complete: bool, counts: dict[str, Any] | None
) -> dict[str, Any]:
    """Manifest ``m`` listing ``shards`` (n_seq and shapes follow), with ``complete`` and the
    ``counts`` file record."""
    n = sum(r["n_seq"] for r in shards)
    shapes = {s: [n, *sh[1:]] for s, sh in m["shapes"].items()}
    return {**m, "shards": list(shards), "n_seq": n, "shapes": shapes, "complete": complete,
            "counts": counts, "n_shards": len(shards)}  # fmt: skip


def check_manifest(m: dict[str, Any], file: Path) -> None:
    """CheckpointError naming the field if manifest ``m`` (read from ``file``) is malformed or
    contradicts itself. Checks only the JSON, no shard file."""
    _check_scalars(m, file)
    _check_sites(m, file)
    _check_shard_list(m, file)
    want = expected_keys(m["sites"], m["has_tokens"])
    if m.get("keys") != want:
        raise CheckpointError(
            f"{file}: 'keys' = {m.get('keys')!r:.200} but sites and has_tokens="
            f"{m['has_tokens']} say every shard holds {want}; the manifest was edited. Restore "
            "it from a copy of the store"
        )


def _shape_of(m: dict[str, Any], key: str, n: int) -> tuple[str, list[int]]:
    """The dtype name and shape of tensor ``key`` in a shard of ``n`` sequences."""
    if key == "tokens":
        return m["token_dtype"], [n, m["seq_len"]]
    kind, site = key.split(".", 1)
    if kind == "codes":
        return m["dtypes"][site], [n, *m["shapes"][site][1:]]
    return "int64", [m["shapes"][site][2], m["n_codes"][site]]


def _check_keys(m: dict[str, Any], sf: ShardFile, n: int) -> None:
    got, want = set(sf.entries), set(m["keys"])
    if got != want:
        extra, missing = sorted(got - want), sorted(want - got)
        hint = ""
        if "tokens" in extra or "tokens" in missing:
            hint = f" (store.json says has_tokens={m['has_tokens']}: was it edited?)"
        raise CheckpointError(
            f"{sf.path} holds keys {sorted(got)}, but store.json expects {sorted(want)} "
            f"(extra {extra}, missing {missing}){hint}; restore store.json or the shard from a "
            "copy of the store"
        )
    for key, e in sf.entries.items():
        dt, shape = _shape_of(m, key, n)
        if DTYPE_NAMES[dt] != e.dtype or list(e.shape) != shape:
            raise CheckpointError(
                f"{sf.path}: {key} is {e.dtype} {list(e.shape)}, store.json says {dt} {shape}; "
                f"{_FIX}"
            )


def _check_identity(m: dict[str, Any], sf: ShardFile, index: int | None) -> None:
    meta = sf.metadata
    if meta.get("format") != STORE_FORMAT:
        raise CheckpointError(f"{sf.path} is not a code store shard; {_FIX}")
    if meta.get("store_id") != m["store_id"]:
        raise CheckpointError(
            f"{sf.path} belongs to another code store (store id {meta.get('store_id')!r}, this "
            f"store is {m['store_id']!r}): it was copied in from elsewhere. {_FIX[0].upper()}"
            f"{_FIX[1:]}"
        )
    if index is not None and meta.get("shard") != str(index):
        raise CheckpointError(
            f"{sf.path} holds shard {meta.get('shard')!r} of this store, not shard {index}: "
            f"shard files were swapped or renamed. Rename them back (each file's metadata names "
            f"its index), or {_FIX[0].lower()}{_FIX[1:]}"
        )


def check_shards(m: dict[str, Any], data: Path) -> list[ShardFile]:
    """The listed shards of a checked manifest, headers parsed; CheckpointError naming the file
    and the fix for a missing, extra (in a complete store), truncated, swapped or foreign shard,
    or one whose keys, dtypes or shapes differ from the manifest. Reads headers only."""
    listed = {r["file"] for r in m["shards"]}
    extra = sorted(n for n in os.listdir(data) if shard_index(n) is not None and n not in listed)
    if extra and m["complete"]:
        raise CheckpointError(
            f"{data} holds shard file(s) {extra[:5]} that store.json does not list (it lists "
            f"{len(listed)}): they are not part of this store. Move them away"
        )
    out = []
    for r in m["shards"]:
        sf = ShardFile.read(data / r["file"], _FIX)
        _check_identity(m, sf, r["index"])
        if sf.size != r["bytes"]:
            raise CheckpointError(
                f"{sf.path} has {sf.size} bytes, store.json records {r['bytes']}: it is "
                f"truncated or was replaced. {_FIX[0].upper()}{_FIX[1:]}"
            )
        _check_keys(m, sf, r["n_seq"])
        out.append(sf)
    return out


def check_counts_file(m: dict[str, Any], data: Path) -> ShardFile | None:
    """The totals file of a complete store, checked like a shard; None if the manifest has
    none."""
    c = m.get("counts")
    if c is None:
        return None
    sf = ShardFile.read(data / c["file"], f"the store's code counts are missing; {_FIX}")
    _check_identity(m, sf, None)
    if sf.metadata.get("n_shards") != str(len(m["shards"])) or sf.size != c["bytes"]:
        raise CheckpointError(
            f"{sf.path} does not belong to this version of the store (its size or shard count "
            f"differs from store.json); {_FIX}"
        )
    want = sorted(f"counts.{s}" for s in m["sites"])
    if sorted(sf.entries) != want:
        raise CheckpointError(f"{sf.path} holds {sorted(sf.entries)}, expected {want}; {_FIX}")
    for key, e in sf.entries.items():
        dt, shape = _shape_of(m, key, 0)
        if DTYPE_NAMES[dt] != e.dtype or list(e.shape) != shape:
            raise CheckpointError(f"{sf.path}: {key} is {e.dtype} {list(e.shape)}; {_FIX}")
    return sf


def verify_hashes(m: dict[str, Any], data: Path) -> None:
    """Hash every shard (and the counts file) and compare with the manifest; CheckpointError
    naming the first file whose content differs."""
    recs = list(m["shards"]) + ([m["counts"]] if m.get("counts") else [])
    for r in recs:
        f = data / r["file"]
        try:
            digest = file_sha256(f)
        except OSError as e:
            raise CheckpointError(f"{f} is unreadable ({e}); {_FIX}") from e
        if digest != r["sha256"]:
            raise CheckpointError(
                f"{f}: its content differs from the SHA-256 in store.json (the file is corrupt "
                f"or was modified); {_FIX}"
            )


def settings_mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings of collection ``new`` that differ from store manifest ``old`` (each as
    "name: stored X, now Y"); empty when a resume may continue ``old``."""
    out = []
    for key, now in new.items():
        if key == "shapes":  # n_seq grows; the per-sequence shape must not change
            was = {s: sh[1:] for s, sh in old.get("shapes", {}).items()}
            now = {s: sh[1:] for s, sh in now.items()}
        elif key in ("data", "codebooks"):  # recorded by collect_codes
            was = (old.get("collect") or {}).get(key)
        else:
            was = old.get(key)
        if was != now:
            out.append(f"{key}: stored {was!r:.120}, now {now!r:.120}")
    return out


def check_codes_range(site: str, c: Tensor, n_codes: int, file: Path) -> None:
    """CheckpointError unless the codes of ``site`` lie in ``[-1, n_codes)``."""
    if c.numel() and (int(c.min()) < -1 or int(c.max()) >= n_codes):
        raise CheckpointError(
            f"codes of {site} lie in [{int(c.min())}, {int(c.max())}], outside [-1, {n_codes}) "
            f"({file} says n_codes={n_codes}); the store is corrupt"
        )


def check_tokens_range(tokens: Tensor, d_vocab: int | None, file: Path) -> None:
    """CheckpointError unless ``tokens`` are integers in ``[0, d_vocab)``."""
    if tokens.is_floating_point() or tokens.is_complex() or str(tokens.dtype) == "torch.bool":
        raise CheckpointError(f"tokens next to {file} have dtype {tokens.dtype}; expected integers")
    hi = d_vocab
    if tokens.numel() and (int(tokens.min()) < 0 or (hi is not None and int(tokens.max()) >= hi)):
        raise CheckpointError(
            f"tokens next to {file} lie in [{int(tokens.min())}, {int(tokens.max())}], outside "
            f"[0, d_vocab={hi})"
        )
