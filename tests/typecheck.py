"""Runtime type checker used by the test run (see ``addopts`` in pyproject.toml).

beartype with the PEP 484 numeric tower, so an ``int`` is accepted where ``float`` is annotated.
"""

from beartype import BeartypeConf, beartype

checker = beartype(conf=BeartypeConf(is_pep484_tower=True))
