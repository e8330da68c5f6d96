"""Trains until done or killed (for test_lm_training's SIGKILL tests):
``python kill_train_worker.py DIR STEPS [accelerate]``.

A tiny codebook model with dead-code replacement trains with ``grad_accum=2`` on batches drawn
from the global RNG, checkpointing every step into ``DIR/ck`` and logging every 4 steps to
``DIR/metrics.jsonl``; a rerun with the same DIR resumes. With ``KILL_AT_MICRO=N`` in the
environment the process sends itself SIGKILL as its N-th micro-batch starts. When it finishes,
it writes ``DIR/final.safetensors`` (every parameter and usage counter) and
``DIR/result.json``. With ``accelerate`` (run it under ``accelerate launch``) it trains through
``make_accelerator()``, each process on its share of every batch, and process 0 writes the
files.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from codebook_lens.atomic import write_file, write_text  # noqa: E402
from codebook_lens.training import exit_processes, make_accelerator, train_codebooks  # noqa: E402
from tests.integration.test_lm_training import _cfg, _cm, _global_rng_stream  # noqa: E402

SEED = 123


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    acc = make_accelerator(mixed_precision="no") if sys.argv[3:] == ["accelerate"] else None
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    cm = _cm(dead=True)
    torch.manual_seed(SEED)

    kill_at, n_micro = int(os.environ.get("KILL_AT_MICRO", 0)), [0]

    def loss(m, tokens):
        n_micro[0] += 1
        if n_micro[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return m(tokens, return_type="loss")

    cfg = _cfg(
        steps=steps,
        log_every=4,
        grad_accum=2,
        checkpoint_dir=str(out / "ck"),
        checkpoint_every=1,
        metrics_path=str(out / "metrics.jsonl"),
    )
    res = train_codebooks(cm, _global_rng_stream(batch=4), cfg, loss_fn=loss, accelerator=acc)
    if acc is None or acc.is_main_process:
        state = {f"param.{k}": v for k, v in cm.state_dict().items()}
        state |= {f"counts.{s}": cb.code_counts for s, cb in cm.codebooks.items()}
        write_file(
            out / "final.safetensors", save({k: v.detach().clone() for k, v in state.items()})
        )
        result = {"resumed_from": res.resumed_from, "history": res.history}
        write_text(out / "result.json", json.dumps(result))
    if acc is not None:
        exit_processes(acc)  # no interpreter teardown: gloo can abort it


if __name__ == "__main__":
    main()
