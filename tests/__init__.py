from tests import typecheck  # noqa: F401  (the runtime checker named in pyproject addopts)
