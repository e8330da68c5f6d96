"""Shared fixtures: tiny random TransformerLens models on both backends, built from config."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Tiny models run fastest on one thread, and CI shares 2 cores with subprocess tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

TINY = dict(
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


def has_hooked_transformer() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def make_model(backend: str, **overrides):
    """A tiny random model; ``backend`` is "hooked" or "bridge"."""
    cfg = {**TINY, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if backend == "hooked":
            if not has_hooked_transformer():
                pytest.skip("this transformer-lens has no HookedTransformer")
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            model = HookedTransformer(HookedTransformerConfig(**cfg))
        else:
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_native(dict(cfg))
    return model.eval()


@pytest.fixture(params=["hooked", pytest.param("bridge", marks=pytest.mark.bridge)])
def backend(request) -> str:
    return request.param


@pytest.fixture
def model(backend):
    return make_model(backend)


@pytest.fixture
def tokens():
    return torch.randint(0, TINY["d_vocab"], (3, 10), generator=torch.Generator().manual_seed(1))
