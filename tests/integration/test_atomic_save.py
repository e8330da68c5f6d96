"""Saving never destroys: refused targets, overwrite=True, versions and leftovers, concurrency,
and loading that runs no code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from codebook_lens import CheckpointError, CodebookModel
from codebook_lens.analysis import CodeStore
from codebook_lens.atomic import READ_LOCK, WRITE_LOCK, data_path
from codebook_lens.io import MODEL_KIND
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[2]


def _cm() -> CodebookModel:
    cm = CodebookModel(make_model())
    cm.add_codebook("blocks.0.hook_resid_post", n_codes=8, k=2)
    return cm


def _store(n: int = 4) -> CodeStore:
    g = torch.Generator().manual_seed(n)
    return CodeStore.from_codes({"a": torch.randint(-1, 7, (n, 5, 2), generator=g)}, 7)


def _listing(p: Path) -> list[str]:
    return sorted(e.name for e in p.iterdir())


@pytest.mark.parametrize("bad", ["", "."])
def test_empty_and_dot_are_refused_up_front(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="directory name"):
        _cm().save(bad)
    with pytest.raises(ValueError, match="directory name"):
        _store().save(bad)
    assert _listing(tmp_path) == []  # nothing hidden left behind


def test_current_directory_and_root_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current directory or a filesystem root"):
        _cm().save(str(tmp_path))
    with pytest.raises(ValueError, match="current directory or a filesystem root"):
        _store().save("/")
    assert _listing(tmp_path) == []


def test_foreign_directory_file_and_symlink_are_kept(tmp_path):
    thesis = tmp_path / "d" / "thesis.tex"
    thesis.parent.mkdir()
    thesis.write_text("years of work")
    with pytest.raises(CheckpointError, match=r"thesis\.tex.*overwrite=True"):
        _cm().save(tmp_path / "d")
    with pytest.raises(CheckpointError, match=r"thesis\.tex"):
        _store().save(tmp_path / "d")
    assert _listing(tmp_path / "d") == ["thesis.tex"]
    f = tmp_path / "file"
    f.write_text("data")
    with pytest.raises(CheckpointError, match="is a file"):
        _cm().save(f, overwrite=True)
    assert f.read_text() == "data"
    (tmp_path / "link").symlink_to(thesis.parent)
    with pytest.raises(CheckpointError, match="symlink"):
        _store().save(tmp_path / "link", overwrite=True)
    assert _listing(tmp_path / "d") == ["thesis.tex"] and thesis.read_text() == "years of work"


def test_overwrite_adds_and_replaces_only_our_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    (d / "v-other").mkdir()
    cm = _cm()
    cm.save(d, overwrite=True)
    cm.codebooks["blocks.0.hook_resid_post"].codebook.data.add_(1.0)
    cm.save(d)  # now ours: no overwrite needed
    assert (d / "notes.txt").read_text() == "keep me" and (d / "v-other").is_dir()
    versions = [n for n in _listing(d) if n.startswith("v-model-")]
    assert len(versions) == 1 and data_path(d, MODEL_KIND).name == versions[0]
    back = CodebookModel.load(d, make_model())
    assert torch.equal(
        back.codebooks["blocks.0.hook_resid_post"].codebook,
        cm.codebooks["blocks.0.hook_resid_post"].codebook,
    )
    # a store saved into the model's directory with overwrite=True leaves the model alone
    _store().save(d, overwrite=True)
    assert CodebookModel.load(d, make_model()).sites == cm.sites
    assert CodeStore.load(d).n_seq == 4


def test_a_different_kind_is_refused_without_overwrite(tmp_path):
    _store().save(tmp_path / "s")
    with pytest.raises(CheckpointError, match="not a CodebookModel checkpoint"):
        _cm().save(tmp_path / "s")


def test_layout_and_leftovers_of_killed_saves_are_cleaned(tmp_path):
    d = tmp_path / "ck"
    _cm().save(d)
    assert _listing(d) == sorted([READ_LOCK, WRITE_LOCK, "cfg.json", data_path(d, MODEL_KIND).name])
    # what kills leave: a half-written version and a temp head file
    (d / f"v-model-{'a' * 32}").mkdir()
    (d / f"v-model-{'a' * 32}" / "codebooks.safetensors").write_bytes(b"half")
    (d / ".cfg.json.x1y2.tmp").write_text("{")
    assert CodebookModel.load(d, make_model()).sites == ["blocks.0.hook_resid_post"]
    _cm().save(d)
    assert len(_listing(d)) == 4 and not (d / f"v-model-{'a' * 32}").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from codebook_lens.analysis import CodeStore
path, seed = sys.argv[1], int(sys.argv[2])
for i in range(25):
    n = 2 + (seed * 25 + i) % 5
    codes = torch.full((n, 5, 1), (seed * 25 + i) % 7)
    CodeStore.from_codes({{"a": codes}}, 7).save(path)
"""

_READER = """
import sys, time
sys.path.insert(0, {root!r})
from codebook_lens.analysis import CodeStore
from codebook_lens import CheckpointError
path = sys.argv[1]
ok = err = 0
deadline = time.time() + 60
while time.time() < deadline:
    try:
        s = CodeStore.load(path)
    except CheckpointError as e:
        err += 1
        continue
    c = s.get("a")
    assert (c == c.flatten()[0]).all(), "a torn store"  # every save writes one constant value
    ok += 1
    if open(sys.argv[2]).read() == "done":
        break
print(ok, err)
"""


def test_two_writers_and_a_reader(tmp_path):
    path = tmp_path / "store"
    # the first store is constant too: the reader may load it before any writer has saved
    CodeStore.from_codes({"a": torch.full((3, 5, 1), 6)}, 7).save(path)
    flag = tmp_path / "flag"
    flag.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    w = textwrap.dedent(_WRITER.format(root=str(ROOT)))
    r = textwrap.dedent(_READER.format(root=str(ROOT)))
    reader = subprocess.Popen(
        [sys.executable, "-c", r, str(path), str(flag)], env=env, stdout=subprocess.PIPE, text=True
    )
    writers = [
        subprocess.Popen([sys.executable, "-c", w, str(path), str(s)], env=env) for s in (0, 1)
    ]
    assert [p.wait(timeout=120) for p in writers] == [0, 0]  # both writers' saves all succeed
    flag.write_text("done")
    out, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0
    ok, err = map(int, out.split())
    assert ok > 0 and err == 0  # the reader always got a whole store
    assert len([n for n in _listing(path) if n.startswith("v-")]) == 1
    assert CodeStore.load(path).n_seq in range(2, 7)


def test_loading_a_checkpoint_runs_no_code_and_stays_offline(tmp_path, monkeypatch):
    cm = _cm()
    cm.save(tmp_path / "ck", include_model=True)
    evil = tmp_path / "evil_tok"
    evil.mkdir()
    marker = tmp_path / "ran"
    (evil / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    (evil / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})
    )
    (evil / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "x.Y"}}))
    meta = json.loads((tmp_path / "ck" / "cfg.json").read_text())
    meta["model"]["config"]["tokenizer_name"] = str(evil)
    meta["model"]["config"]["trust_remote_code"] = True
    (tmp_path / "ck" / "cfg.json").write_text(json.dumps(meta))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import socket

    def no_network(*a, **k):
        raise AssertionError("loading reached for the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    before = set(sys.modules)
    back = CodebookModel.load(tmp_path / "ck")
    assert back.sites == cm.sites
    assert not marker.exists()
    assert not [m for m in set(sys.modules) - before if "evil" in m]


def test_written_files_get_the_mode_open_would_give(tmp_path):
    """Files are written through a 0600 temporary file; the result must be readable as a file
    from ``open()`` would be (0644 under umask 022), not owner-only."""
    from codebook_lens.atomic import write_file

    code = (
        "import os, sys; os.umask(0o022)\n"
        "from codebook_lens.atomic import write_file\n"
        "write_file(sys.argv[1], 'x')\n"
    )
    out = tmp_path / "f.txt"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120)
    assert out.stat().st_mode & 0o777 == 0o644
    write_file(tmp_path / "g.txt", b"y")  # this process's umask, whatever it is
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "g.txt").stat().st_mode & 0o777 == 0o666 & ~umask
