"""Every tutorial runs end to end at its small size, and each notebook matches its paired script.

Each ``tutorials/NN_*.py`` (jupytext percent format) is run as a script in a subprocess with
``CODEBOOK_LENS_SMALL=1``: the tutorial picks CI sizes, asserts its own sanity facts and saves
its figures and views to a temporary directory instead of displaying them. The TokFSM
tutorials share one model cache, so tutorial 2 trains the small model once and tutorials 3 and
4 load it (run alone, each trains it itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
TIMEOUT_S = 600  # per tutorial; each takes well under a minute on a loaded 2-core machine


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tutorial_cache")


def test_tutorials_exist():
    names = [p.name for p in TUTORIALS]
    for want in ("01_quickstart.py", "02_tokfsm.py", "03_interventions.py"):
        assert want in names, names
    assert any(n.startswith("04_") for n in names), names


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_small(script: Path, tmp_path: Path, shared_cache: Path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "CODEBOOK_LENS_SMALL": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "CODEBOOK_LENS_CACHE": str(shared_cache),
        "CODEBOOK_LENS_TUTORIAL_OUT": str(out),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    took = time.perf_counter() - t0
    assert proc.returncode == 0, (
        f"{script.name} failed (exit {proc.returncode}) after {took:.0f} s\n"
        f"--- stdout (tail) ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr (tail) ---\n{proc.stderr[-4000:]}"
    )
    print(f"{script.name}: {took:.1f} s")


def _cells(path: Path) -> list[tuple[str, str]]:
    import jupytext

    nb = jupytext.read(path)
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_notebook_in_sync_with_script(script: Path):
    pytest.importorskip("jupytext", reason="jupytext is a dev dependency: pip install jupytext")
    notebook = script.with_suffix(".ipynb")
    assert notebook.exists(), (
        f"{notebook.name} is missing; create it with `jupytext --to ipynb {script}` (or "
        f"`jupytext --sync {script}`)"
    )
    assert _cells(notebook) == _cells(script), (
        f"{notebook.name} and {script.name} differ; the .py is the source: run "
        f"`jupytext --to ipynb --update {script}` (keeps outputs) or `jupytext --sync {script}`"
    )


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_honours_small_and_states_its_time(script: Path):
    text = script.read_text()
    assert "CODEBOOK_LENS_SMALL" in text, (
        f"{script.name} must pick its size from the CODEBOOK_LENS_SMALL environment variable"
    )
    head = text[:3000].lower()
    assert "cpu" in head and ("time" in head or "takes" in head), (
        f"{script.name} must state, near its top, how long it takes at full size on a CPU"
    )
