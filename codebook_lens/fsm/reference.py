"""The machine of a TokFSM checkpoint of the reference implementation (its ``fsm.npy``), saved
in our format beside a converted model. The converter (:mod:`codebook_lens.convert`) knows no
TokFSM; ``codebook-lens convert`` calls it and then this."""

from __future__ import annotations

import os
from pathlib import Path

from codebook_lens.fsm.machine import FSM
from codebook_lens.hub import resolve_dir

__all__ = ["save_reference_fsm"]


def save_reference_fsm(
    checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], revision: str | None = None
) -> Path | None:
    """Write the reference ``checkpoint``'s ``fsm.npy`` (a local directory or a Hub repo) to
    ``out/fsm.json`` (:meth:`FSM.save`); return that path, or None when it has no machine."""
    src = resolve_dir(checkpoint, revision, ["fsm.npy"])
    if not (src / "fsm.npy").exists():
        return None
    path = Path(out) / "fsm.json"
    FSM.load_npy(src / "fsm.npy").save(path)
    return path
