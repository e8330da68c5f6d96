"""Bookmarks: codes saved with a note (a curated "demo codes" list), one JSON file in DIR.

Every change rewrites ``DIR/bookmarks.json`` atomically (temporary file + rename) under a lock.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from codebook_lens.atomic import write_text
from codebook_lens.browse.errors import BrowseError, bad_request, not_found

__all__ = ["Bookmarks", "MAX_NOTE_LEN", "MAX_BOOKMARKS"]

MAX_NOTE_LEN = 2000
"""Longest note (characters)."""
MAX_BOOKMARKS = 10000
"""Most bookmarks kept."""


class Bookmarks:
    """The bookmarks of one DIR."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()

    def list(self) -> list[dict[str, Any]]:
        """All bookmarks, oldest first."""
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise BrowseError(409, f"{self.path} is corrupt ({e}); fix or delete it") from e
        return list(data.get("bookmarks", []))

    def _write(self, items: list[dict[str, Any]]) -> None:
        write_text(self.path, json.dumps({"bookmarks": items}, indent=1))

    def add(self, site: str, head: int, code: int, note: str) -> dict[str, Any]:
        """Save a code with a note (an existing bookmark of the same code gets the new note)."""
        if len(note) > MAX_NOTE_LEN:
            raise bad_request(f"note of {len(note)} characters; the limit is {MAX_NOTE_LEN}")
        with self.lock:
            items = self.list()
            for b in items:
                if (b["site"], b["head"], b["code"]) == (site, head, code):
                    b["note"] = note
                    self._write(items)
                    return b
            if len(items) >= MAX_BOOKMARKS:
                raise bad_request(f"{MAX_BOOKMARKS} bookmarks already; delete some first")
            new_id = max((b["id"] for b in items), default=0) + 1
            b = {"id": new_id, "site": site, "head": head, "code": code, "note": note,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
            self._write([*items, b])
            return b

    def delete(self, bookmark_id: int) -> None:
        """Remove one bookmark, or a 404."""
        with self.lock:
            items = self.list()
            keep = [b for b in items if b["id"] != bookmark_id]
            if len(keep) == len(items):
                raise not_found(f"no bookmark {bookmark_id}")
            self._write(keep)
