"""Resolve a local directory or a Hugging Face Hub repo id to a directory on disk."""

from __future__ import annotations

import os
from pathlib import Path

from codebook_lens.errors import CheckpointError

__all__ = ["resolve_dir"]


def resolve_dir(
    src: str | os.PathLike, revision: str | None = None, allow_patterns: list[str] | None = None
) -> Path:
    """A local directory as is, else a Hub repo id fetched into (or read from, with
    ``HF_HUB_OFFLINE=1``) huggingface_hub's cache: the files matching ``allow_patterns``
    (``None``: all of them)."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint's directory or a Hub id")
    from huggingface_hub import snapshot_download  # optional, and slow to import
    from huggingface_hub.utils import HFValidationError

    try:
        return Path(snapshot_download(str(src), revision=revision, allow_patterns=allow_patterns))
    except HFValidationError as e:
        raise CheckpointError(f"{src!r} is neither a local directory nor a Hub repo id") from e
    except Exception as e:  # network, missing repo, offline with an empty cache
        raise CheckpointError(
            f"could not get {src!r} from the Hugging Face Hub ({type(e).__name__}: {e}); pass a "
            "local directory, or run once online so that it is cached"
        ) from e
