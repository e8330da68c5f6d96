"""Trains until done or killed (for test_lm_training's SIGKILL test):
``python kill_train_worker.py DIR STEPS``.

A tiny codebook model with dead-code replacement trains with ``grad_accum=2`` on batches drawn
from the global RNG, checkpointing every step into ``DIR/ck`` and logging to
``DIR/metrics.jsonl``; a rerun with the same DIR resumes. When it finishes it writes
``DIR/final.safetensors`` (every parameter and usage counter) and ``DIR/result.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from codebook_lens.atomic import write_file, write_text  # noqa: E402
from codebook_lens.training import train_codebooks  # noqa: E402
from tests.integration.test_lm_training import _cfg, _cm, _global_rng_stream  # noqa: E402

SEED = 123


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    cm = _cm(dead=True)
    torch.manual_seed(SEED)

    def slow_loss(m, tokens):
        time.sleep(0.05)  # leaves the parent time to kill the run mid-way; numbers unchanged
        return m(tokens, return_type="loss")

    cfg = _cfg(
        steps=steps,
        log_every=1,
        grad_accum=2,
        checkpoint_dir=str(out / "ck"),
        checkpoint_every=1,
        metrics_path=str(out / "metrics.jsonl"),
    )
    res = train_codebooks(cm, _global_rng_stream(batch=4), cfg, loss_fn=slow_loss)
    state = {f"param.{k}": v for k, v in cm.state_dict().items()}
    state |= {f"counts.{s}": cb.code_counts for s, cb in cm.codebooks.items()}
    write_file(out / "final.safetensors", save({k: v.detach().clone() for k, v in state.items()}))
    result = {"resumed_from": res.resumed_from, "history": res.history}
    write_text(out / "result.json", json.dumps(result))


if __name__ == "__main__":
    main()
