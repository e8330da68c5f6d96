"""Neuron baseline against a brute-force loop over neurons and thresholds."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens.analysis import neuron_baseline


def brute_baseline(acts, labels, target, n_labels, both_signs):
    """Best precision per label over neurons x thresholds x signs at recall >= target."""
    keep = labels >= 0
    acts, labels = acts[keep], labels[keep]
    best = np.zeros(n_labels)
    per_neuron = np.zeros((acts.shape[1], n_labels))
    for lab in range(n_labels):
        pos = labels == lab
        n_pos = pos.sum()
        if n_pos == 0:
            continue
        for j in range(acts.shape[1]):
            for sign in (1, -1) if both_signs else (1,):
                a = sign * acts[:, j]
                for t in np.unique(a):
                    pred = a >= t
                    tp = (pred & pos).sum()
                    if tp >= max(1, np.ceil(target[lab] * n_pos - 1e-9)):
                        p = tp / pred.sum()
                        per_neuron[j, lab] = max(per_neuron[j, lab], p)
                        best[lab] = max(best[lab], p)
    return best, per_neuron


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_labels=st.integers(1, 4),
    both=st.booleans(),
    quantize=st.booleans(),
)
def test_neuron_baseline_matches_brute_force(seed, n_labels, both, quantize):
    g = torch.Generator().manual_seed(seed)
    n, d = 40, 6
    acts = torch.randn(n, d, generator=g)
    if quantize:  # many ties
        acts = (acts * 2).round()
    labels = torch.randint(-1, n_labels, (n,), generator=g)
    target = torch.rand(n_labels, generator=g)
    res = neuron_baseline(acts, labels, target, n_labels=n_labels, both_signs=both, chunk_mb=1e-3)
    best, per_neuron = brute_baseline(
        acts.numpy().astype(np.float64), labels.numpy(), target.double().numpy(), n_labels, both
    )
    assert np.abs(res.precision.numpy() - best).max() < 1e-6
    assert np.abs(res.precision_per_neuron.numpy() - per_neuron).max() < 1e-6
    # the reported neuron / threshold / sign reproduce the reported precision and recall
    for lab in range(n_labels):
        j = int(res.neuron[lab])
        if j < 0:
            continue
        keep = labels >= 0
        a = float(res.sign[lab]) * acts[keep, j]
        pred = a >= float(res.sign[lab]) * float(res.threshold[lab])
        pos = labels[keep] == lab
        tp = int((pred & pos).sum())
        assert abs(tp / int(pred.sum()) - float(res.precision[lab])) < 1e-6
        assert abs(tp / int(pos.sum()) - float(res.recall[lab])) < 1e-6
        assert float(res.recall[lab]) >= float(target[lab]) - 1e-6


def test_bool_labels_leading_dims_and_float32_recall():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(5, 8, 3, generator=g)
    feat = acts[..., 1] > 0.5  # neuron 1 is a perfect detector
    # a recall like 3/10 stored in float32 is slightly above 0.3 and must not demand 4 of 10
    res = neuron_baseline(acts, feat, torch.tensor([1.0], dtype=torch.float32))
    assert int(res.neuron[0]) == 1 and float(res.precision[0]) == 1.0
    labels = torch.zeros(10, dtype=torch.long)
    a = torch.arange(10.0)[:, None]
    labels[[9, 8, 0]] = 1
    r = neuron_baseline(a, labels, [1.0, torch.tensor(2 / 3, dtype=torch.float32).item()])
    assert float(r.recall[1]) == pytest.approx(2 / 3) and float(r.precision[1]) == 1.0


def test_errors():
    raw = inspect.unwrap(neuron_baseline)  # our own check, beneath the test-time type checker
    with pytest.raises(ValueError, match="neuron axis"):
        raw(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="target_recall"):
        neuron_baseline(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), [0.5, 0.5])
