"""matplotlib figures: the drawn artists hold exactly the data; no pyplot state is touched."""

from __future__ import annotations

import base64
import sys

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from codebook_lens.viz.figures import (
    code_usage_histogram,
    codes_vs_neurons_bars,
    diagonal_order,
    figure_to_data_uri,
    intervention_success_bars,
    state_code_precision_heatmap,
    training_curves,
)


def _bar_heights(ax, i=0):
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    return np.array([p.get_height() for p in bars[i]])


def test_heatmap_image_is_the_data():
    p = torch.rand(6, 9, generator=torch.Generator().manual_seed(0))
    p[2, 3] = float("nan")
    fig = state_code_precision_heatmap(p, sort=False)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    arr = ax.images[0].get_array()
    np.testing.assert_allclose(arr.filled(-1), np.nan_to_num(p.numpy(), nan=-1), rtol=1e-6)
    assert arr.mask[2, 3] and arr.mask.sum() == 1  # NaN (never fires) drawn as "bad"
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(9)]


def test_heatmap_sorted_diagonal_and_max_codes():
    p = np.zeros((3, 5))
    p[0, 4], p[1, 0], p[2, 2], p[1, 3], p[0, 1] = 0.9, 0.8, 0.95, 0.5, 0.1
    ids = [10, 11, 12, 13, 14]
    fig = state_code_precision_heatmap(p, code_ids=ids, sort=True)
    ax = fig.axes[0]
    order = diagonal_order(p)
    assert order.tolist() == [4, 1, 0, 3, 2]  # by best state, then best precision
    np.testing.assert_allclose(ax.images[0].get_array(), p[:, order])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["14", "11", "10", "13", "12"]
    fig = state_code_precision_heatmap(p, code_ids=ids, sort=False, max_codes=3)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["10", "12", "14"]  # the 3 highest best-precision codes, original order
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), p[:, [0, 2, 4]])


def test_heatmap_validation():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        state_code_precision_heatmap(np.full((2, 2), 1.5))
    with pytest.raises(ValueError, match="code_ids has 1 ids but precision has 2 columns"):
        state_code_precision_heatmap(np.zeros((2, 2)), code_ids=[1])
    with pytest.raises(ValueError, match="state_labels has 3 names but precision has 2 rows"):
        state_code_precision_heatmap(np.zeros((2, 2)), state_labels=["a", "b", "c"])


def test_codes_vs_neurons_bar_heights():
    c = np.array([0.5, 0.9, 0.7])
    n = np.array([0.3, 0.6, 0.2])
    ax = codes_vs_neurons_bars(c, n, labels=["s0", "s1", "s2"], sort=False).axes[0]
    np.testing.assert_allclose(_bar_heights(ax, 0), c)
    np.testing.assert_allclose(_bar_heights(ax, 1), n)
    ax = codes_vs_neurons_bars(torch.tensor(c), torch.tensor(n), labels=["s0", "s1", "s2"]).axes[0]
    np.testing.assert_allclose(_bar_heights(ax, 0), [0.9, 0.7, 0.5])  # sorted by code precision
    np.testing.assert_allclose(_bar_heights(ax, 1), [0.6, 0.2, 0.3])  # paired with their neurons
    assert [t.get_text() for t in ax.get_xticklabels()] == ["s1", "s2", "s0"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["code (mean 0.700)", "neuron (mean 0.367)"]
    # ValueError "code_prec has 3 values but neuron_prec has 2", or TypeError from the
    # run-time shape check (jaxtyping: both are " n"), which the test run turns on
    with pytest.raises((ValueError, TypeError), match="neuron_prec"):
        codes_vs_neurons_bars(c, n[:2])


def test_intervention_success_bars():
    rates = {"attn": 0.9, "mlp": 0.4, "attn+mlp": 0.95}
    fig = intervention_success_bars(
        rates, baseline=0.1, errors={"attn": 0.01, "mlp": 0.02, "attn+mlp": 0.0}
    )
    ax = fig.axes[0]
    np.testing.assert_allclose(_bar_heights(ax), list(rates.values()))
    assert [t.get_text() for t in ax.get_xticklabels()] == list(rates)
    assert [t.get_text() for t in ax.texts] == ["0.90", "0.40", "0.95"]
    assert any(np.allclose(line.get_ydata(), 0.1) for line in ax.get_lines())
    with pytest.raises(ValueError, match="errors has keys"):
        intervention_success_bars(rates, errors={"attn": 0.1})
    with pytest.raises(ValueError, match="empty"):
        intervention_success_bars({})
    with pytest.raises(ValueError, match="finite"):
        intervention_success_bars({"a": float("nan")})


def test_code_usage_histogram_counts_live_and_dead():
    counts = torch.tensor([[0, 1, 5, 5, 100], [0, 0, 2, 3, 1000]])
    fig = code_usage_histogram({"blocks.0.attn.hook_z": counts, "mlp": np.array([1, 2, 3])})
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    heights = [p.get_height() for p in axes[0].patches]
    assert sum(heights) == 7  # live codes; heads pooled
    assert "10 codes, 3 dead (30.0%)" in axes[0].get_title()
    assert axes[0].get_xscale() == "log"
    assert "3 codes, 0 dead" in axes[1].get_title()
    all_dead = code_usage_histogram(torch.zeros(4)).axes[0]
    assert "4 dead (100.0%)" in all_dead.get_title()
    with pytest.raises(ValueError, match=">= 0"):
        code_usage_histogram(np.array([1, -1]))


def test_training_curves_plot_history():
    hist = [
        {"step": 50, "loss": 3.0, "recon": 10.0, "dead_frac": 0.5, "lr": 1e-3},
        {"step": 100, "loss": 2.0, "recon": 0.01, "dead_frac": 0.2, "lr": 1e-3, "acc": 0.9},
    ]
    fig = training_curves(hist)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss", "recon", "dead_frac", "acc"]
    x, y = axes[0].get_lines()[0].get_data()
    np.testing.assert_allclose(x, [50, 100])
    np.testing.assert_allclose(y, [3.0, 2.0])
    assert axes[1].get_yscale() == "log"  # recon spans three decades
    y_acc = axes[3].get_lines()[0].get_ydata()
    assert np.isnan(y_acc[0]) and y_acc[1] == 0.9  # a gap where the metric is missing
    with pytest.raises(ValueError, match="has no \\['nope'\\]"):
        training_curves(hist, keys=["nope"])
    with pytest.raises(ValueError, match="row 0 has no 'step'"):
        training_curves([{"loss": 1.0}])
    with pytest.raises(ValueError, match="empty"):
        training_curves([])


def test_figure_to_data_uri_png_svg_deterministic():
    fig = intervention_success_bars({"a": 0.5})
    png = figure_to_data_uri(fig)
    assert png.startswith("data:image/png;base64,")
    assert base64.b64decode(png.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure_to_data_uri(fig) == png
    svg = figure_to_data_uri(fig, fmt="svg")
    assert svg.startswith("data:image/svg+xml;base64,")
    assert b"<svg" in base64.b64decode(svg.split(",", 1)[1])
    assert figure_to_data_uri(fig, fmt="svg") == svg
    with pytest.raises((ValueError, TypeError), match="fmt"):
        figure_to_data_uri(fig, fmt="jpg")  # type: ignore[arg-type]


def test_no_pyplot_state_touched():
    backend = matplotlib.get_backend()
    plt = sys.modules.get("matplotlib.pyplot")
    before = plt.get_fignums() if plt else []
    training_curves([{"step": 1, "loss": 1.0}])
    state_code_precision_heatmap(np.eye(3))
    assert matplotlib.get_backend() == backend
    if plt is not None:
        assert plt.get_fignums() == before
