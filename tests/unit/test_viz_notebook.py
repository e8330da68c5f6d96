"""viz.show: a script saves figures and views and says where; a notebook displays them."""

from __future__ import annotations

import sys
import types

import pytest

from codebook_lens import viz
from codebook_lens.viz.notebook import in_notebook, show


def _figure():
    fig = viz.new_figure(2, 1.5)
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def test_new_figure_is_off_pyplot():
    fig = viz.new_figure(3, 2)
    assert tuple(fig.get_size_inches()) == (3, 2)
    assert fig.canvas.__class__.__name__ == "FigureCanvasAgg"
    assert fig.get_layout_engine().__class__.__name__ == "ConstrainedLayoutEngine"


def test_script_saves_and_prints(tmp_path, capsys):
    assert not in_notebook()
    png = show(_figure(), "curve", tmp_path)
    html = show(viz.html_view("<p>hi</p>"), "view", tmp_path)
    assert png == tmp_path / "curve.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert html == tmp_path / "view.html" and "<p>hi</p>" in html.read_text()
    assert capsys.readouterr().out.splitlines() == [f"[saved {png}]", f"[saved {html}]"]
    assert viz.show is show


@pytest.fixture
def fake_ipython(monkeypatch):
    """An IPython whose ``get_ipython`` answers and whose ``display`` records what it shows."""
    shown: list[object] = []
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: object()
    display = types.ModuleType("IPython.display")
    display.display = shown.append
    display.Image = lambda filename: ("Image", filename)
    ipython.display = display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    return shown


def test_notebook_displays(tmp_path, capsys, fake_ipython):
    assert in_notebook()
    view = viz.html_view("<p>hi</p>")
    assert show(view, "view", tmp_path) is None
    png = show(_figure(), "curve", tmp_path)
    assert png == tmp_path / "curve.png" and png.is_file()
    assert fake_ipython == [view, ("Image", str(png))]
    assert not (tmp_path / "view.html").exists()
    assert capsys.readouterr().out == ""
