"""The trainer's scale features: accumulation, Accelerate, mixed precision, checkpoint/resume."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from codebook_lens import CheckpointError, CodebookModel
from codebook_lens.checkpoint import checkpoint_path
from codebook_lens.training import TrainConfig, make_accelerator, train_codebooks
from tests.conftest import make_model


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state; give every test a clean one."""
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _batches(n, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, 10, (batch, 1), generator=g)
        out.append((start + torch.arange(12)) % 10)
    return out


def _global_rng_stream(batch=8):
    """Batches drawn from the global RNG (resume must restore it after skipping)."""
    while True:
        start = torch.randint(0, 10, (batch, 1))
        yield (start + torch.arange(12)) % 10


def _cm(dead=False):
    torch.manual_seed(0)
    cm = CodebookModel(make_model())
    kw = dict(dead_code_threshold=1.0, replace_every=3) if dead else {}
    cm.add_codebook("blocks.0.attn.hook_z", n_codes=16, k=2, **kw)
    cm.add_codebook("blocks.1.hook_mlp_out", n_codes=16, k=1, input_norm="layernorm", **kw)
    cm.init_codebooks(_batches(1, seed=9)[0])
    return cm


def _cfg(**kw):
    base = dict(steps=6, lr=3e-3, warmup_steps=2, log_every=2, progress=False)
    return TrainConfig(**{**base, **kw})


def _params(cm):
    """The model's state but the codebooks' recent activations (a sample of the last micro-batch,
    in the activations' dtype: other micro-batches, another sample)."""
    return {k: v.detach().clone() for k, v in cm.state_dict().items() if not k.endswith(".recent")}


def test_grad_accumulation_matches_the_big_batch():
    big = _batches(6, batch=8)
    halves = [h for b in big for h in b.split(4)]
    # float64: in float32 a rounding difference can flip a near-tie code choice
    a, b = _cm().double(), _cm().double()
    ra = train_codebooks(a, big, _cfg())
    rb = train_codebooks(b, halves, _cfg(grad_accum=2))
    pa, pb = _params(a), _params(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-7, atol=1e-9, msg=k)
    assert [r["loss"] for r in ra.history] == pytest.approx([r["loss"] for r in rb.history])


def test_one_process_accelerator_equals_plain_pytorch():
    a, b = _cm(), _cm()
    train_codebooks(a, _batches(6), _cfg())
    acc = make_accelerator(cpu=True, mixed_precision="no")
    train_codebooks(b, _batches(6), _cfg(), accelerator=acc)
    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def _train_seeing_dtypes(mixed_precision: str) -> tuple[dict[str, set], list[float], dict]:
    """Train ``_cm()`` 4 steps under ``mixed_precision``; the dtypes that plain PyTorch forward
    hooks saw during training (the input a codebook quantizes, a matmul output of a site without
    a codebook), the losses and the final parameters."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cm = _cm()
    seen: dict[str, set] = {"codebook input": set(), "mlp_out without codebook": set()}
    blocks = cm.model.blocks
    handles = [
        blocks[0].attn.hook_z.register_forward_hook(
            lambda m, inp, out: seen["codebook input"].add(inp[0].dtype)
        ),
        blocks[0].hook_mlp_out.register_forward_hook(
            lambda m, inp, out: seen["mlp_out without codebook"].add(out.dtype)
        ),
    ]
    acc = make_accelerator(cpu=True, mixed_precision=mixed_precision)
    res = train_codebooks(cm, _batches(4), _cfg(steps=4, log_every=1), accelerator=acc)
    for h in handles:
        h.remove()
    return seen, [r["loss"] for r in res.history], _params(cm)


def test_bf16_mixed_precision_trains_on_cpu():
    seen, losses, params = _train_seeing_dtypes("bf16")
    # autocast was on: the matmul outputs of the training forward, including what the codebook
    # quantizes, were bfloat16 (in the fp32 run below the same hooks see float32)
    assert seen == {
        "codebook input": {torch.bfloat16},
        "mlp_out without codebook": {torch.bfloat16},
    }
    assert all(torch.isfinite(torch.tensor(x)) for x in losses) and len(losses) == 4
    # the parameters and the optimizer stay float32 (mixed precision, not a bf16 model)
    assert {v.dtype for v in params.values() if v.is_floating_point()} == {torch.float32}
    seen32, losses32, params32 = _train_seeing_dtypes("no")
    assert seen32 == {
        "codebook input": {torch.float32},
        "mlp_out without codebook": {torch.float32},
    }
    # bf16 arithmetic gives other losses than fp32 from the same start, but close ones (bf16 has
    # 8 bits of mantissa: a relative error of ~0.4% per op; 5% leaves room for 4 steps of drift)
    assert losses != losses32
    assert losses == pytest.approx(losses32, rel=0.05)
    assert any(not torch.equal(params[k], params32[k]) for k in params)
    with pytest.raises(ValueError, match="mixed_precision"):
        make_accelerator(cpu=True, mixed_precision="half")


def test_resume_gives_the_state_of_an_uninterrupted_run(tmp_path):
    steps = 12
    cfg = _cfg(steps=steps, log_every=3)
    torch.manual_seed(123)
    ref = _cm(dead=True)
    torch.manual_seed(123)
    ref_res = train_codebooks(ref, _global_rng_stream(), cfg)

    ck = _cfg(
        steps=steps,
        log_every=3,
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_every=4,
        metrics_path=str(tmp_path / "metrics.jsonl"),
    )
    calls = {"n": 0}

    def crashing_loss(m, t):
        calls["n"] += 1
        if calls["n"] == 7:  # during step 7: the checkpoint of step 4 is the latest
            raise KeyboardInterrupt
        return m(t, return_type="loss")

    torch.manual_seed(123)
    cm = _cm(dead=True)
    torch.manual_seed(123)
    with pytest.raises(KeyboardInterrupt):
        train_codebooks(cm, _global_rng_stream(), ck, loss_fn=crashing_loss)
    assert json.loads((checkpoint_path(ck.checkpoint_dir) / "state.json").read_text())["step"] == 4
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [3, 6]

    torch.manual_seed(999)  # a fresh process: different model init and RNG, same setup
    fresh = _cm(dead=True)
    torch.manual_seed(999)
    res = train_codebooks(fresh, _global_rng_stream(), ck)
    assert res.resumed_from == 4
    want, got = _params(ref), _params(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want)
    for s, cb in ref.codebooks.items():
        assert torch.equal(cb.code_counts, fresh.codebooks[s].code_counts)
    assert res.history == ref_res.history
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == ref_res.history  # no duplicated or lost rows


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import codebook_lens.tensor_files as tensor_files

    cm = _cm()
    cfg = _cfg(steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    real = tensor_files.save_file
    n = {"calls": 0}

    def failing_save(*a, **k):
        n["calls"] += 1
        if n["calls"] == 2:  # the step-4 checkpoint dies half-way
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(tensor_files, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train_codebooks(cm, _batches(8), cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temp dirs left
    assert train_codebooks(_cm(), _batches(8), cfg).resumed_from == 2
    cfg = _cfg(steps=6, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    (checkpoint_path(tmp_path) / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        train_codebooks(_cm(), _batches(8), cfg)


def test_checkpoint_of_another_setup_is_refused(tmp_path):
    cm = _cm()
    train_codebooks(cm, _batches(2), _cfg(steps=2, checkpoint_dir=str(tmp_path)))
    other = CodebookModel(make_model())
    other.add_codebook("blocks.0.hook_resid_post", n_codes=8, k=1)
    with pytest.raises(CheckpointError, match="fresh checkpoint_dir"):
        train_codebooks(other, _batches(2), _cfg(steps=3, checkpoint_dir=str(tmp_path)))


def test_plain_model_training_and_config_errors(monkeypatch):
    model = make_model()
    cm = CodebookModel(model)
    with pytest.raises(ValueError, match="allow_no_codebooks"):
        train_codebooks(cm, _batches(2), _cfg())
    res = train_codebooks(cm, _batches(4), _cfg(steps=20, log_every=10, allow_no_codebooks=True))
    assert res.history[-1]["task_loss"] < res.history[0]["task_loss"]
    assert "dead_frac" not in res.history[-1]
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    monkeypatch.setitem(sys.modules, "wandb", None)
    cm.add_codebook("blocks.0.hook_mlp_out", n_codes=8, k=1)
    with pytest.raises(ImportError, match="pip install wandb"):
        train_codebooks(cm, _batches(2), _cfg(wandb_project="x"))


def _worker_cmd(d, steps: int, processes: int) -> list[str]:
    """The command that trains kill_train_worker.py's run in ``d`` on ``processes`` processes."""
    import socket
    from pathlib import Path

    worker = str(Path(__file__).with_name("kill_train_worker.py"))
    if processes == 1:
        return [sys.executable, worker, str(d), str(steps)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # torchrun behind --multi_gpu starts N CPU processes when no GPU is visible (see
    # test_lm_accelerate.py); they form a gloo group
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(port),
        worker, str(d), str(steps), "accelerate",
    ]  # fmt: skip


@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_with_grad_accum_resumes_bit_exact(tmp_path, processes):
    """Training (grad_accum=2, dead-code replacement every 3 steps, data from the global RNG,
    a checkpoint every step, a log row every 4) is killed with SIGKILL as step 6 starts, each
    process killing itself; the rerun resumes from step 5, between two log rows and two
    maintenances, to the parameters, usage counters, history and metrics rows of an
    uninterrupted run, bit for bit. Every run is a fresh process (group) with one thread per
    process, so the arithmetic is the same in each."""
    import os
    import signal
    import subprocess
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    steps = 10

    def run(d: Path, **extra: str) -> int:
        cmd = _worker_cmd(d, steps, processes)
        proc = subprocess.run(cmd, env={**env, **extra}, capture_output=True, timeout=600)
        return proc.returncode

    assert run(tmp_path / "whole") == 0
    killed = tmp_path / "killed"
    rc = run(killed, KILL_AT_MICRO="11")  # the first micro-batch of step 6
    assert rc == -signal.SIGKILL if processes == 1 else rc != 0  # the launcher reports it
    assert json.loads((checkpoint_path(killed / "ck") / "state.json").read_text())["step"] == 5
    assert not (killed / "result.json").exists()
    assert run(killed) == 0
    whole = json.loads((tmp_path / "whole" / "result.json").read_text())
    resumed = json.loads((killed / "result.json").read_text())
    assert (whole["resumed_from"], resumed["resumed_from"]) == (0, 5)
    assert resumed["history"] == whole["history"]
    assert [r["step"] for r in whole["history"]] == [4, 8, 10]
    a = load_file(tmp_path / "whole" / "final.safetensors")
    b = load_file(killed / "final.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("counts.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [(d / "metrics.jsonl").read_text().splitlines() for d in (tmp_path / "whole", killed)]
    assert rows[0] == rows[1]  # no duplicated or lost rows
