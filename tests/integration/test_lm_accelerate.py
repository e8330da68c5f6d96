"""Two processes under ``accelerate launch`` train exactly like one process with the same global
batch, and the ranks stay identical through dead-code replacement."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
WORKER = HERE / "lm_accelerate_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, n: int) -> subprocess.CompletedProcess:
    # N CPU processes: accelerate 1.x's `--cpu --num_processes N` starts ONE process unless an
    # MPI hostfile is given (its simple launcher); the torchrun launcher behind `--multi_gpu`
    # with no visible GPU starts N processes, and make_accelerator() joins them in a gloo group
    # on the CPU (asserted below through the worker's device and distributed type).
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(WORKER),
        str(out),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_match_one_process(tmp_path):
    pytest.importorskip("accelerate")
    sys.path.insert(0, str(HERE))
    try:
        import lm_accelerate_worker as w
    finally:
        sys.path.remove(str(HERE))
    proc = _launch(tmp_path / "two", 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["num_processes"] == 2
    assert run["device"] == "cpu" and run["distributed_type"].endswith("MULTI_CPU")
    assert run["ranks_identical_after_replacement"]

    torch.manual_seed(0)
    cm = w.build()
    ref = w.train_codebooks(cm, w.batches(), w.config())  # one process, plain PyTorch
    got = load_file(str(tmp_path / "two" / "state.safetensors"))
    want = w.state(cm)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-7, atol=1e-9, msg=k)
    for a, b in zip(run["history"], ref.history):
        assert a["step"] == b["step"]
        for key in ("loss", "task_loss", "recon", "dead_frac"):
            assert a[key] == pytest.approx(b[key], rel=1e-7, abs=1e-9), key
