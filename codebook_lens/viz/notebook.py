"""Show a figure or a view where the code runs: inline in a notebook, as a file from a script.

The tutorials are notebooks paired with plain scripts (jupytext); :func:`show` lets one cell
serve both. In Jupyter/IPython it displays the object; run as a script it saves the object under
a folder and prints where, so CI can run every tutorial without a display.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from codebook_lens.viz.offline import View

__all__ = ["in_notebook", "show"]


def in_notebook() -> bool:
    """True inside Jupyter/IPython (figures and views are displayed), False as a script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def show(obj: Figure | View, name: str, out_dir: str | os.PathLike[str]) -> Path | None:
    """Display a matplotlib ``Figure`` or a :class:`~codebook_lens.viz.offline.View`.

    In a notebook a figure is saved as ``out_dir/<name>.png`` (100 dpi) and displayed as that
    image (a ``Figure`` built without pyplot has no display of its own); a view is displayed
    directly. As a script the figure is saved the same way, or the view as
    ``out_dir/<name>.html`` (:meth:`View.save`), and ``[saved PATH]`` is printed. Returns the
    file written, or None when nothing was.
    """
    out = Path(out_dir)
    is_figure = hasattr(obj, "savefig")
    if in_notebook():
        from IPython.display import Image, display

        if not is_figure:
            display(obj)
            return None
        path = out / f"{name}.png"
        obj.savefig(path, dpi=100)
        display(Image(filename=str(path)))
        return path
    if is_figure:
        path = out / f"{name}.png"
        obj.savefig(path, dpi=100)
    else:
        path = out / f"{name}.html"
        obj.save(path)
    print(f"[saved {path}]")
    return path
