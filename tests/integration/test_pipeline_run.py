"""The run pipeline end to end through the command line, in subprocesses, on a tiny Hugging Face
model saved to a directory and a dataset of local files: train, evaluate, collect, browse; a run
killed with SIGKILL resumes to the result of an uninterrupted one; bad input gets a clear error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from codebook_lens import CodebookModel
from codebook_lens.analysis import CodeStore
from codebook_lens.data import pydoc_texts
from tests.conftest import offline_env
from tests.hf_fixtures import save_hf_model, save_texts

pytestmark = pytest.mark.bridge

ROOT = Path(__file__).resolve().parents[2]
ENV = offline_env(
    HF_DATASETS_OFFLINE="1",
    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
)

CONFIG = """
[model]
name = "{model}"

[data]
path = "{data}"
context_len = 32
batch_size = 4
eval_tokens = 512
eval_fraction = 0.1

[[sites]]
pattern = "blocks.*.attn.hook_z"
n_codes = 32
k = 2

[[sites]]
pattern = "blocks.1.hook_mlp_out"
n_codes = 64
k = 1
input_norm = "layernorm"

[train]
steps = {steps}
warmup_steps = 2
log_every = 2
eval_every = 6
checkpoint_every = 2
progress = false
"""


def cli(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "codebook_lens.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"codebook-lens {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2 with a BPE tokenizer, a JSON-lines corpus and a config file."""
    root = tmp_path_factory.mktemp("pipeline")
    model = save_hf_model(root / "gpt2", "gpt2")
    texts = [t.replace("\n", " ") for t in pydoc_texts()[:40]]
    data = save_texts(root / "data", texts, "jsonl")

    def config(steps: int = 12) -> Path:
        f = root / f"run{steps}.toml"
        f.write_text(CONFIG.format(model=model, data=data, steps=steps))
        return f

    return root, config


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    cm = CodebookModel.load(model_dir)
    return {k: v.detach().clone() for k, v in cm.state_dict().items()}


def test_train_evaluate_collect_browse(setup, tmp_path):
    root, config = setup
    run = tmp_path / "run"
    out = cli("train", str(config()), "--out", str(run)).stdout
    assert "loss_recovered" in out and "explained_variance" in out
    doc = json.loads((run / "run.json").read_text())
    assert set(doc["status"]) >= {"train", "evaluate"}
    assert doc["versions"]["transformer-lens"] != "-"
    assert (run / "report.html").stat().st_size > 10_000
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 13, 2))
    assert any("all/loss_recovered_zero" in r for r in rows)  # eval_every during training
    first = json.loads((run / "evaluation.json").read_text())
    assert first["all"]["ce_base"] > 0 and set(first["sites"]) == {
        "blocks.0.attn.hook_z", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out",
    }  # fmt: skip

    cli("evaluate", str(run))  # the same held-out tokens and model: the same numbers
    again = json.loads((run / "evaluation.json").read_text())
    for key in ("ce_base", "ce_codebook", "loss_recovered_zero", "kl_to_base"):
        assert again["all"][key] == pytest.approx(first["all"][key], rel=1e-5), key

    cli("collect", str(run), "--tokens", "1024")
    store = CodeStore.load(run / "store")
    assert store.n_tokens >= 1024 and store.sites == list(first["sites"])
    cm = CodebookModel.load(run / "model")
    tokens = store.tokens[:2].long()
    _, cache = cm.run_with_cache(tokens)
    for site in store.sites:  # stored codes are the model's codes of the stored tokens
        assert torch.equal(store.get(site)[:2], cache[f"{site}.hook_codes"]), site
    _browse_one_page(run)


def _browse_one_page(run: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "codebook_lens.cli", "browse", str(run), "--port", str(port)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/overview") as r:
                    overview = json.loads(r.read())
                break
            except OSError:
                assert time.time() < deadline, "the browser did not start"
                time.sleep(0.5)
        assert "blocks.0.attn.hook_z" in json.dumps(overview)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_train_killed_with_sigkill_resumes_to_the_uninterrupted_result(setup, tmp_path):
    root, config = setup
    cfg = config(steps=16)
    whole = tmp_path / "whole"
    cli("train", str(cfg), "--out", str(whole))
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "codebook_lens.cli", "train", str(cfg), "--out", str(run)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not _checkpoint_step(run) >= 6:  # killed mid-run, after some checkpoints
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "model").exists()
    refused = cli("train", str(cfg), "--out", str(run), check=False)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    cli("train", "--resume", "--out", str(run))  # the saved config; no file needed
    a, b = _tensors(whole / "model"), _tensors(run / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = (whole / "metrics.jsonl").read_text().splitlines()
    hb = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in ha] == [json.loads(x)["loss"] for x in hb]


def _checkpoint_step(run: Path) -> int:
    """The step of the run's training checkpoint (``state.json``), 0 before the first."""
    try:
        return int(json.loads((run / "train" / "checkpoint" / "state.json").read_text())["step"])
    except (OSError, KeyError, ValueError):
        return 0


def _accelerate(n: int, *args: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The torchrun launcher behind --multi_gpu starts N CPU processes when no GPU is visible;
    # make_accelerator() joins them in a gloo group (see test_lm_accelerate.py).
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "codebook_lens.cli", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"


def test_two_processes_train_and_collect_like_one(setup, tmp_path):
    pytest.importorskip("accelerate")
    root, config = setup
    cfg = config(steps=6)
    one, two = tmp_path / "one", tmp_path / "two"
    cli("train", str(cfg), "--out", str(one))
    _accelerate(2, "train", str(cfg), "--out", str(two))
    a, b = _tensors(one / "model"), _tensors(two / "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    copy = tmp_path / "copy"  # the same trained model, so the codes must be equal
    shutil.copytree(one, copy)
    cli("collect", str(one), "--tokens", "512")
    _accelerate(2, "collect", str(copy), "--tokens", "512")
    sa, sb = CodeStore.load(one / "store"), CodeStore.load(copy / "store")
    assert torch.equal(sa.tokens, sb.tokens)
    for site in sa.sites:
        assert torch.equal(sa.get(site), sb.get(site)), site
