"""Atomic writes: single files, and checkpoint directories replaced in one step.

**Files** (:func:`write_file`): the data goes to a temporary file in the same folder, is
fsynced, renamed over the target with ``os.replace`` and the folder is fsynced. A kill at any
moment leaves the old file or the new one.

**Checkpoint directories** (:func:`save_dir`, read with :func:`open_dir`). ``path`` stays a real
directory; a save never renames or deletes ``path`` itself::

    path/<head>            the kind's metadata file (cfg.json, store.json, state.json, ...) plus
                           "data_dir": "v-<tag>-<32 hex>", the version holding the data;
                           replacing this one file is the commit
    path/v-<tag>-<hex>/    the live version's data files (exactly one after a completed save)
    path/.cbl-write.lock   flock, exclusive for a whole save (concurrent writers take turns)
    path/.cbl-read.lock    flock, shared while reading; a writer takes it exclusively only to
                           delete versions nobody can see any more

A save writes a new version directory completely (every file fsynced), then switches the head
file atomically (temporary file, fsync, ``os.replace``, fsync of ``path``), then deletes the
other versions of its kind and leftovers of interrupted saves. A kill at any moment therefore
leaves the old or the new checkpoint at ``path``; the next save removes what the killed one
left. Readers see the head and the version it names, or a clear :class:`CheckpointError` (a
head without ``data_dir`` is refused).

A save refuses ``""``, ``"."``, the current directory, a filesystem root, a symlink, a file,
and a non-empty directory that is not a checkpoint of the same kind (unless
``overwrite=True``, which still replaces only this module's own files). Locking uses
``fcntl.flock`` (POSIX); where it is missing, saves are still atomic but not serialised.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codebook_lens.errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DirKind",
    "WRITE_LOCK",
    "READ_LOCK",
    "write_file",
    "write_text",
    "check_save_target",
    "save_dir",
    "open_dir",
    "holds_data",
    "data_path",
]

WRITE_LOCK = ".cbl-write.lock"
"""Lock file held exclusively by a writer for a whole save."""
READ_LOCK = ".cbl-read.lock"
"""Lock file held shared by readers, exclusively by a writer while it deletes old versions."""

_HEX = re.compile(r"[0-9a-f]{32}")
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp makes 0600 files, written files get open()'s mode


@dataclass(frozen=True)
class DirKind:
    """One kind of checkpoint directory."""

    name: str
    """What it is, for messages (e.g. "CodebookModel checkpoint")."""
    head: str
    """Its metadata file, which is also the commit pointer (e.g. "cfg.json")."""
    format: str
    """The value of ``"format"`` in the head file."""
    tag: str
    """Short name in version directories (``v-<tag>-<hex>``)."""
    saver: str = ""
    """The call that writes it, for messages."""


# ---------------------------------------------------------------------------------- files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically and durably; return the path.

    A temporary file in the same folder is written and fsynced, renamed over ``path`` and the
    folder fsynced; parents are created. A kill leaves the old file or the new one (and at
    worst a ``.<name>.*.tmp`` file, which the next :func:`save_dir` in that folder removes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_file` for text."""
    write_file(path, text)


# ---------------------------------------------------------------------------------- locks
def _open_lock(file: Path, create: bool) -> int | None:
    """A descriptor of lock ``file``. Readers (``create=False``) never create one: every
    checkpoint has it (its writer made it), and a copy may be read-only data."""
    if create:
        return os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        return os.open(file, os.O_RDONLY)
    except OSError:
        return None


@contextmanager
def _flock(file: Path, exclusive: bool, create: bool = True) -> Iterator[None]:
    """Hold ``flock`` on ``file``; ``create=False`` (readers) tolerates a read-only folder."""
    fd = _open_lock(file, create) if fcntl is not None else None
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------- layout
def _bookkeeping(name: str) -> bool:
    """Entries this module owns in any checkpoint directory (locks, versions, temp heads)."""
    return (
        name in (WRITE_LOCK, READ_LOCK)
        or _version_tag(name) is not None
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def _version_tag(name: str) -> str | None:
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "v" and _HEX.fullmatch(parts[2]):
        return parts[1]
    return None


def _read_head(path: Path, kind: DirKind) -> dict[str, Any] | None:
    """The parsed head file, None when there is none; CheckpointError when it is corrupt."""
    file = path / kind.head
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is unreadable ({e}); the {kind.name} is corrupt") from e
    try:
        head = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(
            f"{file} is unreadable (not valid JSON: {e}); the {kind.name} is corrupt"
        ) from e
    if not isinstance(head, dict) or head.get("format") != kind.format:
        raise CheckpointError(
            f"{file} is not a {kind.name} (its format marker is not {kind.format!r})"
        )
    return head


def _is_ours(path: Path, kind: DirKind) -> bool:
    try:
        return _read_head(path, kind) is not None
    except CheckpointError:
        return False


def holds_data(path: str | os.PathLike[str]) -> bool:
    """Whether directory ``path`` holds anything besides this module's bookkeeping (lock files,
    leftovers of interrupted saves). False for a missing path."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return path.exists() or path.is_symlink()
    return any(not _bookkeeping(e) for e in os.listdir(path))


def check_save_target(path: str | os.PathLike[str], kind: DirKind, overwrite: bool) -> Path:
    """Refuse a save target that would lose data or cannot be a directory; return it as a Path.

    Raises ValueError for ``""``, ``"."``, the current directory or a filesystem root, and
    :class:`CheckpointError` for a symlink, a file, or a non-empty directory that is not a
    ``kind`` checkpoint (unless ``overwrite``).
    """
    if str(path).strip() in ("", "."):
        raise ValueError(
            f"refusing to save a {kind.name} to {str(path)!r}; pass a directory name such as "
            "'my_codebooks'"
        )
    p = Path(path)
    if p.is_symlink():
        raise CheckpointError(
            f"{p} is a symlink (to {os.readlink(p)}); saving never follows links. Pass the "
            "real directory, or another path"
        )
    resolved = p.resolve()
    if resolved == Path.cwd().resolve() or resolved == resolved.parent:
        raise ValueError(
            f"refusing to save a {kind.name} to {str(path)!r} ({resolved}): it is the current "
            "directory or a filesystem root; pass a new subdirectory such as 'my_codebooks'"
        )
    if p.exists() and not p.is_dir():
        raise CheckpointError(
            f"{p} is a file, not a directory; saving a {kind.name} there would destroy it. "
            "Choose another path (or move the file away)"
        )
    if p.is_dir() and not overwrite and not _is_ours(p, kind):
        foreign = sorted(e for e in os.listdir(p) if not _bookkeeping(e))
        if foreign:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if foreign[5:] else ""
            )
            raise CheckpointError(
                f"{p} already holds {shown}, and it is not a {kind.name}; saving never deletes "
                "other data. Choose another (new or empty) path, or pass overwrite=True to add "
                "the checkpoint there (only codebook_lens's own files are ever replaced)"
            )
    return p


def _remove(entry: Path) -> None:
    if entry.is_symlink() or not entry.is_dir():
        entry.unlink(missing_ok=True)
    else:
        shutil.rmtree(entry, ignore_errors=True)


def _cleanup(path: Path, kind: DirKind, keep: str | None) -> None:
    """Delete ``kind``'s versions other than ``keep`` and temp heads; under the exclusive read
    lock, so no reader loses its files."""
    with _flock(path / READ_LOCK, exclusive=True, create=True):
        for name in os.listdir(path):
            stale_version = _version_tag(name) == kind.tag and name != keep
            stale_tmp = name.startswith(f".{kind.head}.") and name.endswith(".tmp")
            if stale_version or stale_tmp:
                _remove(path / name)
    _fsync_dir(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            file = Path(dirpath) / f
            if file.is_symlink():
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def save_dir(
    path: str | os.PathLike[str],
    kind: DirKind,
    head: dict[str, Any],
    write: Callable[[Path], None],
    overwrite: bool = False,
) -> Path:
    """Save a ``kind`` checkpoint at ``path`` in one atomic step; return the version directory.

    ``write(version_dir)`` writes the data files; ``head`` (JSON-ready, with ``"format":
    kind.format``) becomes ``path/<kind.head>`` with ``"data_dir"`` added. Concurrent saves to
    one path take turns (each succeeds, the last one wins). On an exception nothing of this
    save stays behind and the previous checkpoint is untouched.
    """
    p = check_save_target(path, kind, overwrite)
    p.mkdir(parents=True, exist_ok=True)
    with _flock(p / WRITE_LOCK, exclusive=True, create=True):
        p = check_save_target(p, kind, overwrite)  # another writer may have gone first
        old = _head_or_none(p, kind)
        _cleanup(p, kind, keep=None if old is None else old.get("data_dir"))
        vname = f"v-{kind.tag}-{uuid.uuid4().hex}"
        vdir = p / vname
        try:
            vdir.mkdir()
            write(vdir)
            _fsync_tree(vdir)
            _fsync_dir(p)
            write_file(p / kind.head, json.dumps({**head, "data_dir": vname}, indent=1))
        except BaseException:
            _remove(vdir)
            raise
        _cleanup(p, kind, keep=vname)
    return vdir


def _head_or_none(path: Path, kind: DirKind) -> dict[str, Any] | None:
    try:
        return _read_head(path, kind)
    except CheckpointError:
        return None  # a foreign or corrupt head, replaced under overwrite=True


def _data_dir(path: Path, head: dict[str, Any], kind: DirKind) -> Path:
    name = head.get("data_dir")
    if name is None:
        raise CheckpointError(
            f"{path / kind.head} names no data directory ('data_dir'); it is not a {kind.name} "
            f"this codebook_lens reads. Write it again with {kind.saver}"
        )
    if not isinstance(name, str) or _version_tag(name) != kind.tag:
        raise CheckpointError(
            f"{path / kind.head}: data_dir={name!r} is not a version directory of a {kind.name}"
        )
    data = path / name
    if data.is_symlink() or not data.is_dir():
        raise CheckpointError(
            f"{path / kind.head} names {name}, which is missing (or not a plain directory); the "
            f"{kind.name} is incomplete"
        )
    return data


@contextmanager
def open_dir(path: str | os.PathLike[str], kind: DirKind) -> Iterator[tuple[dict[str, Any], Path]]:
    """Read a ``kind`` checkpoint: yields ``(head, data_dir)`` while holding the shared read lock.

    ``data_dir`` is the live version directory; its files stay in place until the block ends,
    even if a writer commits a newer version meanwhile. Raises :class:`CheckpointError` when
    ``path`` is not a directory, has no head file, or the head is corrupt, foreign, or names no
    version or a missing one.
    """
    p = Path(path)
    if not p.is_dir():
        what = " (it does not exist)" if not p.exists() else ""
        raise CheckpointError(
            f"{p} is not a directory{what}; expected a {kind.name} written by {kind.saver}"
        )
    with _flock(p / READ_LOCK, exclusive=False, create=False):
        head = _read_head(p, kind)
        if head is None:
            raise CheckpointError(
                f"{p} has no {kind.head}; it is not a {kind.name} written by {kind.saver}"
            )
        yield head, _data_dir(p, head, kind)


def data_path(path: str | os.PathLike[str], kind: DirKind) -> Path:
    """Where the data files of the ``kind`` checkpoint at ``path`` are now: its live version
    directory. For inspection; loaders use :func:`open_dir`, which also keeps the files in
    place while they read."""
    with open_dir(path, kind) as (_head, data):
        return data
