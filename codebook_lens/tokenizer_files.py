"""Saved tokenizers: ``tokenizer.json`` plus ``tokenizer_config.json`` (``save_pretrained``) in
a versioned directory written atomically, never pickled; read as data (no code, no network).

The LM experiment saves its tokenizer here and the browser reads it, so neither imports the
other (:mod:`codebook_lens.lm.tokenizer` trains the tokenizer itself).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from codebook_lens.atomic import DirKind, open_dir, save_dir

__all__ = ["TOKENIZER_KIND", "save_tokenizer", "load_tokenizer"]

TOKENIZER_KIND = DirKind(
    name="saved tokenizer",
    head="codebook_lens_tokenizer.json",
    format="codebook_lens.tokenizer",
    tag="tok",
    saver="save_tokenizer",
)
"""The on-disk kind of :func:`save_tokenizer` output (for :mod:`codebook_lens.atomic`)."""


def save_tokenizer(tokenizer: Any, path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (``save_pretrained``) to directory
    ``path`` in one atomic step (a version directory named by ``codebook_lens_tokenizer.json``).

    A directory holding anything but a saved tokenizer is refused unless ``overwrite=True``."""
    head = {"format": TOKENIZER_KIND.format, "version": 1}
    save_dir(
        Path(path),
        TOKENIZER_KIND,
        head,
        lambda tmp: tokenizer.save_pretrained(str(tmp)),
        overwrite=overwrite,
    )


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load a tokenizer written by :func:`save_tokenizer` (or any local HF tokenizer dir, read
    as data: no code, no network)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if (path / TOKENIZER_KIND.head).exists():
        with open_dir(path, TOKENIZER_KIND) as (_head, data):
            return PreTrainedTokenizerFast.from_pretrained(str(data), local_files_only=True)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path} has no tokenizer.json; save one with save_tokenizer()")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
