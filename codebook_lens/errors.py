"""Errors raised by several modules, in one place so that none imports another only for them."""

from __future__ import annotations

__all__ = ["CheckpointError", "BackendError"]


class CheckpointError(ValueError):
    """A saved directory is missing, corrupt, foreign, or does not fit the model given."""


class BackendError(ValueError):
    """A backend was asked for that this transformer-lens cannot provide, or a model cannot be
    moved between backends."""
