"""Collecting codes to disk: equal to a collection in memory, resumable after an exception or a
real SIGKILL (then equal to an uninterrupted run), refusing to mix settings or data, and under
two real processes (Accelerate, gloo on the CPU) equal to one process.

On transformer-lens 4.x ``make_model()`` builds a TransformerBridge, on 3.x a HookedTransformer.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from codebook_lens.analysis import CodeStore, collect_codes
from codebook_lens.errors import CheckpointError
from tests.integration.collect_worker import BATCH, N_SEQ, SHARD, build, slow_batches, tokens

pytestmark = pytest.mark.bridge
HERE = Path(__file__).parent
ROOT = HERE.parents[1]
WORKER = HERE / "collect_worker.py"
KW = dict(batch_size=BATCH, progress=False, shard_seqs=SHARD)


@pytest.fixture(scope="module")
def cm():
    return build()


@pytest.fixture(scope="module")
def ref(cm, tmp_path_factory):
    """An uninterrupted one-process collection to disk (the worker's settings)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    return collect_codes(cm, tokens(), out=out, data_id={"name": "worker"}, **KW)


def same_store(a: CodeStore, b: CodeStore) -> None:
    assert a.sites == b.sites and a.n_seq == b.n_seq
    for s in a.sites:
        assert torch.equal(a.codes[s], b.codes[s]), s
        assert torch.equal(a.code_counts(s), b.code_counts(s)), s
    assert torch.equal(a.tokens, b.tokens)


def test_disk_collection_equals_memory(cm, ref, tmp_path):
    mem = collect_codes(cm, tokens(), **KW)
    same_store(mem, ref)
    assert ref.n_shards == 8 and ref.path is not None and ref.manifest["complete"]
    ref.verify()
    dicts = [{"input_ids": b} for b in tokens().split(5)]  # batches cut across shard ends
    same_store(ref, collect_codes(cm, dicts, out=tmp_path / "dicts", **KW))
    endless = collect_codes(cm, slow_batches(0.0), out=tmp_path / "endless", max_seqs=10, **KW)
    assert endless.n_seq == 10 and torch.equal(endless.get(cm.sites[0]), ref.get(cm.sites[0])[:10])
    by_tokens = collect_codes(cm, tokens(), max_tokens=10 * 9 + 4, **KW)  # whole sequences
    assert by_tokens.n_seq == 10


def test_resume_extends_a_finished_store(cm, ref, tmp_path):
    out = tmp_path / "s"
    first = collect_codes(cm, tokens(), out=out, max_seqs=10, data_id={"name": "worker"}, **KW)
    assert first.n_seq == 10 and [r["n_seq"] for r in first.manifest["shards"]] == [3, 3, 3, 1]
    again = collect_codes(cm, tokens(), out=out, max_seqs=10, data_id={"name": "worker"}, **KW)
    assert again.manifest["store_id"] == first.manifest["store_id"]  # nothing to do
    more = collect_codes(cm, tokens(), out=out, data_id={"name": "worker"}, **KW)
    same_store(more, ref)  # the short shard was collected again, then the rest
    assert more.manifest["store_id"] == first.manifest["store_id"]
    with pytest.raises(ValueError, match="already holds 23 sequences, more than max_seqs=5"):
        collect_codes(cm, tokens(), out=out, max_seqs=5, data_id={"name": "worker"}, **KW)


def _failing(after: int):
    """The worker's batches, then an exception after ``after`` batches."""
    for i, b in enumerate(tokens().split(BATCH)):
        if i == after:
            raise RuntimeError("interrupted")
        yield b


def test_interrupted_collection_resumes_exactly(cm, ref, tmp_path):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="interrupted"):
        collect_codes(cm, _failing(7), out=out, data_id={"name": "worker"}, **KW)
    with pytest.raises(CheckpointError, match="incomplete code store.*allow_partial=True"):
        CodeStore.open(out)
    part = CodeStore.open(out, allow_partial=True)
    assert part.n_seq == 12 and not part.manifest["complete"]  # 14 sequences read, 4 shards
    assert torch.equal(part.get(cm.sites[1]), ref.get(cm.sites[1])[:12])
    done = collect_codes(cm, tokens(), out=out, data_id={"name": "worker"}, **KW)
    same_store(done, ref)
    CodeStore.open(out, verify=True)


def _changed_model():
    cm = build()
    with torch.no_grad():
        cm.codebook("blocks.1.hook_mlp_out").codebook.mul_(1.01)
    return cm


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(shard_seqs=4), "shard_seqs"),
        (dict(sites=["blocks.0.attn.hook_z"]), "sites"),
        (dict(data_id={"name": "other"}), "data"),
        (dict(keep_tokens=False), "has_tokens"),
        (dict(model=True), "codebooks"),
        (dict(data=tokens()[:, :8]), "seq_len"),
    ],
)
def test_resume_refuses_other_settings(cm, ref, tmp_path, change, field):
    out = tmp_path / "s"
    collect_codes(cm, tokens(), out=out, data_id={"name": "worker"}, **KW)
    kw = {**KW, "data_id": {"name": "worker"}, **change}
    model = _changed_model() if kw.pop("model", False) else cm
    data = kw.pop("data", tokens())
    with pytest.raises(CheckpointError, match=f"other settings.*{field}: stored.*resume=False"):
        collect_codes(model, data, out=out, **kw)
    same_store(CodeStore.open(out, verify=True), ref)  # untouched
    replaced = collect_codes(model, data, out=out, resume=False, **kw)
    assert replaced.manifest["store_id"] != ref.manifest["store_id"]
    assert len([p for p in out.iterdir() if p.name.startswith("v-")]) == 1


def test_resume_refuses_other_data_and_keeps_the_store(cm, ref, tmp_path):
    out = tmp_path / "s"
    collect_codes(cm, tokens(), out=out, data_id={"name": "worker"}, **KW)
    with pytest.raises(CheckpointError, match=r"data differs.*shard 1 \(sequences 3..5\)"):
        collect_codes(cm, tokens(changed=4), out=out, data_id={"name": "worker"}, **KW)
    with pytest.raises(CheckpointError, match="ran out after 2 shard"):
        collect_codes(cm, tokens(6), out=out, data_id={"name": "worker"}, **KW)
    same_store(CodeStore.open(out, verify=True), ref)  # still complete and the same


def test_collect_refuses_foreign_directories_and_a_second_writer(cm, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a CodeStore"):
        collect_codes(cm, tokens(), out=foreign, **KW)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / ".cbl-write.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(CheckpointError, match="another process is writing"):
            collect_codes(cm, tokens(), out=out, **KW)
    finally:
        os.close(fd)


def test_bad_arguments(cm, tmp_path):
    for kw, match in [
        (dict(max_seqs=3, max_tokens=30), "max_seqs or max_tokens"),
        (dict(max_tokens=5), "fewer than one sequence"),
        (dict(max_seqs=0), "positive"),
        (dict(batch_size=0), "positive"),
        (dict(shard_seqs=0), "positive"),
        (dict(data_id={"t": torch.zeros(1)}), "data_id must be JSON"),
    ]:
        with pytest.raises(ValueError, match=match):
            collect_codes(cm, tokens(), **{**KW, **kw}, out=tmp_path / "x")
    with pytest.raises(ValueError, match="empty"):
        collect_codes(cm, [], out=tmp_path / "y", progress=False)


# ------------------------------------------------------------------------- real processes
def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}


def _committed(out: Path) -> int:
    try:
        return len(json.loads((out / "store.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return -1


def _run_and_kill(out: Path, at_shards: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "kill", str(out)], env=_env(), stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while _committed(out) < at_shards:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the worker wrote no shards"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_collection_then_resume_equals_uninterrupted(cm, ref, tmp_path):
    out = tmp_path / "s"
    _run_and_kill(out, 2)
    with pytest.raises(CheckpointError, match="incomplete"):
        CodeStore.open(out)
    part = CodeStore.open(out, allow_partial=True)
    assert 2 <= part.n_shards < 8
    assert torch.equal(part.get(cm.sites[0]), ref.get(cm.sites[0])[: part.n_seq])
    _run_and_kill(out, part.n_shards + 2)  # the resumed process is killed too
    done = collect_codes(cm, tokens(), out=out, data_id={"name": "worker"}, **KW)
    same_store(done, ref)
    done.verify()
    assert done.manifest["store_id"] == part.manifest["store_id"]
    data = out / done.manifest["data_dir"]
    assert sorted(p.name for p in data.iterdir()) == sorted(
        [f"shard-{i:05d}.safetensors" for i in range(8)] + ["counts.safetensors"]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(cm, ref, tmp_path):
    pytest.importorskip("accelerate")
    started = collect_codes(cm, tokens(), out=tmp_path / "resumed", max_seqs=7, **KW)
    assert started.n_shards == 3  # 3 + 3 + 1: two processes resume it
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(WORKER), "accelerate", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["num_processes"] == 2 and r["n_seq"] == [N_SEQ, N_SEQ] for r in ranks)
    for name in ("two", "resumed"):
        got = CodeStore.open(tmp_path / name, verify=True)
        same_store(got, ref)
        assert [r["n_seq"] for r in got.manifest["shards"]] == [3] * 7 + [2]
        if name == "resumed":
            assert got.manifest["store_id"] == started.manifest["store_id"]
    # other data in a shard that process 1 checks: both processes raise, none hangs
    assert ranks[1]["error"].startswith("CheckpointError: the data differs")
    assert ranks[0]["error"].startswith("CheckpointError: process 1 of the collection failed")
    same_store(CodeStore.open(tmp_path / "two"), ref)  # still complete
