"""`BrowseError`: a user-actionable failure of a browser request, with its HTTP status."""

from __future__ import annotations

__all__ = ["BrowseError", "not_found", "bad_request"]


class BrowseError(Exception):
    """An error the client caused (or can fix); ``status`` is a 4xx HTTP status.

    The message names the problem and the fix; the app turns it into
    ``{"error": message}`` with that status.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(message: str) -> BrowseError:
    """A 404: an unknown site, head, code, sequence or bookmark."""
    return BrowseError(404, message)


def bad_request(message: str) -> BrowseError:
    """A 400: a malformed query (bad regex, prompt, intervention, position)."""
    return BrowseError(400, message)
