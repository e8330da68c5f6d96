"""Worker for ``test_collect_disk.py``: collect codes to disk in a separate process.

    python collect_worker.py kill OUT            # slow collection, to be killed with SIGKILL
    accelerate launch --multi_gpu --num_processes 2 collect_worker.py accelerate OUT

``kill`` collects ``N_SEQ`` sequences into OUT (resuming what is there), pausing between
batches so that the test can kill it mid-collection. ``accelerate`` collects into OUT/two with
every process, resumes OUT/resumed (started by one process), and tries to resume OUT/two with
data changed in a shard that process 1 owns; each process writes OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from codebook_lens import CodebookModel
from codebook_lens.analysis import collect_codes
from tests.conftest import make_model  # the launcher puts the repository root on PYTHONPATH

N_SEQ = 23
SHARD = 3
BATCH = 2
SEQ_LEN = 9


def build() -> CodebookModel:
    """The same tiny model in every process: a per-head site with k=2 and a flat one."""
    torch.manual_seed(0)
    cm = CodebookModel(make_model())
    cm.add_codebook("blocks.0.attn.hook_z", n_codes=16, k=2)
    cm.add_codebook("blocks.1.hook_mlp_out", n_codes=200, k=1)
    return cm.eval()


def tokens(n: int = N_SEQ, changed: int | None = None) -> torch.Tensor:
    """``n`` sequences (the same in every process); sequence ``changed`` altered if given."""
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 11, (n, SEQ_LEN), generator=g)
    if changed is not None:
        t[changed] = (t[changed] + 1) % 11
    return t


def slow_batches(delay: float) -> Iterator[torch.Tensor]:
    """The tokens in batches of 2, with a pause before each, then endlessly more."""
    t = tokens()
    while True:
        for b in t.split(BATCH):
            time.sleep(delay)
            yield b


def kill_run(out: Path) -> None:
    cm = build()
    collect_codes(cm, slow_batches(0.05), batch_size=BATCH, progress=False, out=out,
                  shard_seqs=SHARD, max_seqs=N_SEQ, data_id={"name": "worker"})  # fmt: skip


def accelerate_run(out: Path) -> None:
    from codebook_lens.training import exit_processes, make_accelerator

    acc = make_accelerator(mixed_precision="no")
    cm = build()
    kw = dict(batch_size=BATCH, progress=False, shard_seqs=SHARD, accelerator=acc)
    two = collect_codes(cm, tokens(), out=out / "two", **kw)
    resumed = collect_codes(cm, tokens(), out=out / "resumed", **kw)
    try:  # sequence 4 lies in shard 1, which process 1 checks
        collect_codes(cm, tokens(N_SEQ + 5, changed=4), out=out / "two", **kw)
        error = None
    except Exception as e:  # noqa: BLE001 - the test reads what each process saw
        error = f"{type(e).__name__}: {e}"
    rank = {
        "num_processes": acc.num_processes,
        "n_seq": [two.n_seq, resumed.n_seq],
        "error": error,
    }
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(rank))
    exit_processes(acc)  # no interpreter teardown: gloo can abort it


if __name__ == "__main__":
    {"kill": kill_run, "accelerate": accelerate_run}[sys.argv[1]](Path(sys.argv[2]))
