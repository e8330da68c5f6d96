"""Shard files of a code store: safetensors written atomically with a content hash, and read
memory-mapped.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape, ``data_offsets`` into the data section; ``__metadata__``: string pairs) and the raw
data. :class:`ShardFile` parses the header itself (checking every offset against the file
size) and maps each tensor with ``numpy.memmap`` in copy-on-write mode, so
``torch.from_numpy`` gives a zero-copy view whose pages are read from disk only when touched,
whatever the installed safetensors version does (0.8's ``safe_open`` maps too, older ones copy).
Writing uses ``safetensors.torch.save`` (so the files are plain safetensors), hashes the bytes
with SHA-256 on the way and commits them with :func:`codebook_lens.atomic.write_file`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from torch import Tensor

from codebook_lens.atomic import write_file
from codebook_lens.errors import CheckpointError
from codebook_lens.tensor_files import untie

__all__ = [
    "TensorEntry",
    "ShardFile",
    "write_shard",
    "file_sha256",
    "shard_name",
    "shard_index",
    "DTYPE_NAMES",
    "STORE_FORMAT",
    "COUNTS_FILE",
    "write_store_shard",
    "write_counts_file",
]

STORE_FORMAT = "codebook_lens.code_store"
"""The format marker of a code store's manifest and of every file in it."""
COUNTS_FILE = "counts.safetensors"
"""The file holding a complete store's code counts summed over its shards."""

DTYPE_NAMES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64}
"""The dtypes a store file may hold, by the name the manifest uses."""

_ST_DTYPES = {"I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}
_NP = {torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}
_MAX_HEADER = 100 * 2**20
_NAME = re.compile(r"shard-(\d{5,})\.safetensors")


def shard_name(index: int) -> str:
    """The file name of shard ``index`` (``shard-00003.safetensors``)."""
    return f"shard-{index:05d}.safetensors"


def shard_index(name: str) -> int | None:
    """The index in a shard file name, None for other names."""
    m = _NAME.fullmatch(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    dtype: torch.dtype
    """Its dtype (one of the integer dtypes of :data:`DTYPE_NAMES`)."""
    shape: tuple[int, ...]
    """Its shape."""
    offset: int
    """Absolute byte offset of its data in the file."""


def _bad(file: Path, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{file} {what}; {fix}")


def _entry(file: Path, key: str, v: object, data_start: int, size: int, fix: str) -> TensorEntry:
    if not isinstance(v, dict) or v.get("dtype") not in _ST_DTYPES:
        raise _bad(file, f"holds {key!r} with an unexpected dtype ({v!r:.80})", fix)
    shape, offs = v.get("shape"), v.get("data_offsets")
    if not (isinstance(shape, list) and all(type(x) is int and x >= 0 for x in shape)):
        raise _bad(file, f"holds {key!r} with a malformed shape {shape!r:.80}", fix)
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(x) is int for x in offs)):
        raise _bad(file, f"holds {key!r} with malformed data_offsets {offs!r:.80}", fix)
    dtype = _ST_DTYPES[v["dtype"]]
    nbytes = math.prod(shape) * dtype.itemsize
    if not 0 <= offs[0] <= offs[1] <= size - data_start or offs[1] - offs[0] != nbytes:
        raise _bad(file, f"is truncated or corrupt ({key!r} lies outside its data)", fix)
    return TensorEntry(dtype, tuple(shape), data_start + offs[0])


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ShardFile:
    """The parsed header of one safetensors file; :meth:`tensor` maps a tensor from it."""

    path: Path
    """The file."""
    size: int
    """Its size in bytes when it was read."""
    metadata: dict[str, str]
    """Its ``__metadata__`` (string pairs)."""
    entries: dict[str, TensorEntry]
    """Tensor name -> where it lies."""
    identity: tuple[int, int, int, int]
    """``(device, inode, size, mtime_ns)`` when read: a replaced file is refused, never mapped
    with the old header's offsets."""

    @classmethod
    def read(cls, path: Path, fix: str) -> ShardFile:
        """Parse ``path``'s header; CheckpointError naming the file and ``fix`` if it is missing,
        truncated or not a safetensors file of integer tensors. Reads only the header."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                size = st.st_size
                raw = f.read(8)
                n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
                if not 0 < n <= min(size - 8, _MAX_HEADER):
                    raise _bad(path, "is truncated or not a safetensors file", fix)
                header = json.loads(f.read(n))
        except FileNotFoundError as e:
            raise _bad(path, "is missing", fix) from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise _bad(path, f"is unreadable ({e})", fix) from e
        if not isinstance(header, dict):
            raise _bad(path, "has a malformed header", fix)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _bad(path, "has malformed metadata", fix)
        entries = {k: _entry(path, k, v, 8 + n, size, fix) for k, v in header.items()}
        return cls(path, size, meta, entries, _identity(st))

    def tensor(self, key: str) -> Tensor:
        """Tensor ``key``, memory-mapped copy-on-write: no data is read until it is used, and
        writing to it never changes the file. It stays valid after the file is replaced."""
        e = self.entries[key]
        if math.prod(e.shape) == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        gone = (
            f"{self.path} changed or vanished since the store was opened (a collection or a "
            "save replaced it); open the store again"
        )
        try:
            with open(self.path, "rb") as f:
                if _identity(os.fstat(f.fileno())) != self.identity:
                    raise CheckpointError(gone)
                arr = np.memmap(f, dtype=_NP[e.dtype], mode="c", offset=e.offset, shape=e.shape)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{gone} ({err})") from err
        return torch.from_numpy(arr)


def write_shard(
    tensors: dict[str, Tensor], file: Path, metadata: dict[str, str]
) -> tuple[int, str]:
    """Write ``tensors`` with ``metadata`` to safetensors ``file`` atomically and durably; return
    the file's size in bytes and its SHA-256 (hex), hashed from the bytes written."""
    blob = save(untie(tensors), metadata=metadata)
    digest = hashlib.sha256(blob).hexdigest()
    write_file(file, blob)
    return len(blob), digest


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    """The SHA-256 (hex) of ``path``'s content, read in blocks of ``block`` bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_store_shard(
    data: Path,
    store_id: str,
    index: int,
    codes: dict[str, Tensor],
    tokens: Tensor | None,
    counts: dict[str, Tensor],
) -> dict[str, object]:
    """Write shard ``index`` of store ``store_id`` into ``data`` (keys ``codes.<site>``,
    ``tokens`` if given, ``counts.<site>``); return its manifest record (file, index, n_seq,
    bytes, sha256)."""
    tensors = {f"codes.{s}": c for s, c in codes.items()}
    tensors.update({f"counts.{s}": c for s, c in counts.items()})
    if tokens is not None:
        tensors["tokens"] = tokens
    n_seq = next(iter(codes.values())).shape[0]
    meta = {"format": STORE_FORMAT, "store_id": store_id, "shard": str(index), "n_seq": str(n_seq)}
    nbytes, digest = write_shard(tensors, data / shard_name(index), meta)
    return {"file": shard_name(index), "index": index, "n_seq": n_seq, "bytes": nbytes,
            "sha256": digest}  # fmt: skip


def write_counts_file(
    data: Path, store_id: str, n_shards: int, counts: dict[str, Tensor]
) -> dict[str, object]:
    """Write the code counts summed over ``n_shards`` shards into ``data``; return its manifest
    record (file, bytes, sha256)."""
    meta = {"format": STORE_FORMAT, "store_id": store_id, "n_shards": str(n_shards)}
    tensors = {f"counts.{s}": c for s, c in counts.items()}
    nbytes, digest = write_shard(tensors, data / COUNTS_FILE, meta)
    return {"file": COUNTS_FILE, "bytes": nbytes, "sha256": digest}
