"""The run pipeline: one run directory, the steps that fill it."""

__all__: list[str] = []
