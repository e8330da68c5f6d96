"""Config classes under the test run's type checker (tests/typecheck.py): their ``__init__``
is left to their own checks, everything else is still checked, and their types stay readable."""

from __future__ import annotations

import typing

import jaxtyping
import pytest
import torch

from codebook_lens.config import CodebookConfig
from codebook_lens.io import SavedCodebooks
from codebook_lens.tensor_files import check_tensor


def test_configs_stay_introspectable_and_the_test_checker_still_checks_the_rest(tmp_path):
    """Tools that read a config's types (typing.get_type_hints) see every field; the test
    run's type checker leaves config __init__ to the config's own friendlier checks, and still
    checks other classes and functions."""
    hints = typing.get_type_hints(CodebookConfig)
    assert hints["n_codes"] is int and set(typing.get_args(hints["similarity"])) == {
        "cosine", "dot", "euclidean"
    }  # fmt: skip
    with pytest.raises(ValueError, match="choose one of"):
        CodebookConfig(d_in=2, n_codes=2, similarity="cosin")
    with pytest.raises(jaxtyping.TypeCheckError):
        SavedCodebooks(configs=[], tensors={}, model=None)  # type: ignore[arg-type]
    with pytest.raises(jaxtyping.TypeCheckError):
        check_tensor(torch.zeros(2), "x", None, (2,), "float")  # type: ignore[arg-type]
