"""Shared fixtures: tiny random TransformerLens models on both backends, built from config."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
from torch import nn

from codebook_lens import CodebookModel
from codebook_lens.backends import build_model, has_hooked_transformer, tl_version

# Tiny models run fastest on one thread, and CI shares 2 cores with subprocess tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

TINY = dict(  # the one tiny model config of the test suite; make_model builds it
    n_layers=2,
    d_model=32,
    n_heads=4,
    d_head=8,
    d_mlp=64,
    n_ctx=16,
    d_vocab=11,
    act_fn="gelu",
    normalization_type="LN",
    seed=0,
)


def make_model(backend: str = "auto", *, tokenizer: Any = None, **overrides: Any) -> nn.Module:
    """A tiny random model: :data:`TINY` with ``overrides`` (any config field). ``backend`` is
    "hooked", "bridge" or "auto" (the installed transformer-lens's default); "hooked" skips on
    transformer-lens 4.x. ``tokenizer`` goes to ``build_model`` (a Hugging Face tokenizer)."""
    if backend == "hooked" and not has_hooked_transformer():
        pytest.skip(f"transformer-lens {tl_version()} has no HookedTransformer")
    return build_model({**TINY, **overrides}, backend, tokenizer=tokenizer)


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess under test: this process's, on one CPU thread with no
    GPU and the Hugging Face Hub offline, then ``extra``."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def attach_codebooks(
    model: nn.Module, sites: dict[str, dict[str, Any]], tokens: torch.Tensor | None = None
) -> CodebookModel:
    """A :class:`CodebookModel` of ``model`` with one codebook per site (``{site: fields}``),
    initialized from ``tokens`` when they are given."""
    cm = CodebookModel(model)
    for site, fields in sites.items():
        cm.add_codebook(site, **fields)
    if tokens is not None:
        cm.init_codebooks(tokens)
    return cm


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection attempt fails the test (local paths and data must never reach
    the Hub)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


needs_hooked = pytest.mark.skipif(
    not has_hooked_transformer(), reason="needs HookedTransformer (transformer-lens 3.x)"
)
needs_tl4 = pytest.mark.skipif(
    has_hooked_transformer(), reason="checks transformer-lens 4.x behaviour"
)


@pytest.fixture(params=["hooked", pytest.param("bridge", marks=pytest.mark.bridge)])
def backend(request) -> str:
    if request.param == "hooked" and not has_hooked_transformer():
        pytest.skip(f"transformer-lens {tl_version()} has no HookedTransformer")
    return request.param


@pytest.fixture
def user_view():
    """The errors users see: the test run type-checks every call (pyproject addopts, see
    tests/typecheck.py) and users do not, so the run-time checker is off for the test."""
    import jaxtyping

    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", before)


@pytest.fixture
def model(backend):
    return make_model(backend)


@pytest.fixture
def tokens():
    return torch.randint(0, TINY["d_vocab"], (3, 10), generator=torch.Generator().manual_seed(1))
