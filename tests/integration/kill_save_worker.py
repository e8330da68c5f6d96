"""Saves in a loop until killed (for test_kill_save): ``python kill_save_worker.py KIND PATH``.

Touches ``PATH.ready`` after its first completed save."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.integration.test_kill_save import KINDS  # noqa: E402


def main() -> None:
    kind, path = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    KINDS[kind].loop(path, lambda: Path(f"{path}.ready").touch())


if __name__ == "__main__":
    main()
