"""Worker for ``test_lm_accelerate.py``: train a tiny codebook model under ``accelerate launch``.

Run as ``accelerate launch --multi_gpu --num_processes N lm_accelerate_worker.py OUT_DIR``. The
main process writes ``OUT_DIR/state.safetensors`` (every parameter and usage counter) and
``OUT_DIR/run.json`` (history, process count, and whether the ranks ended identical).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from codebook_lens import CodebookModel
from codebook_lens.training import TrainConfig, exit_processes, make_accelerator, train_codebooks
from tests.conftest import make_model  # the launcher puts the repository root on PYTHONPATH

STEPS = 6
GLOBAL_BATCH = 8


def batches() -> list[torch.Tensor]:
    """Global batches: sequences counting up mod 10 (same on every process)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS * 2):
        start = torch.randint(0, 10, (GLOBAL_BATCH, 1), generator=g)
        out.append((start + torch.arange(12)) % 10)
    return out


def build() -> CodebookModel:
    """The tiny model with one per-head and one flat codebook, initialised from data."""
    cm = CodebookModel(make_model())
    cm.add_codebook("blocks.0.attn.hook_z", n_codes=16, k=2)
    cm.add_codebook("blocks.1.hook_mlp_out", n_codes=16, k=1, input_norm="layernorm")
    cm.init_codebooks(batches()[0])
    # float64: in float32 the different summation order of 1 vs 2 processes can flip a
    # near-tie code choice, after which the runs legitimately part ways
    return cm.double()


def config(**kw) -> TrainConfig:
    """The training setup shared by the distributed run and the reference."""
    return TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=2, log_every=2, progress=False, **kw)


def state(cm: CodebookModel) -> dict[str, torch.Tensor]:
    """Everything that training changes."""
    sd = {f"model.{k}": v for k, v in cm.model.state_dict().items()}
    for s, cb in cm.codebooks.items():
        sd[f"cb.{s}"] = cb.codebook.detach()
        sd[f"counts.{s}"] = cb.code_counts
    return {k: v.detach().contiguous().cpu().clone() for k, v in sd.items()}


def main(out: Path) -> None:
    acc = make_accelerator(mixed_precision="no")
    cm = build()
    res = train_codebooks(cm, batches(), config(), accelerator=acc)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_file(state(cm), str(out / "state.safetensors"))
    # a second short phase with dead-code replacement: the ranks must stay identical
    cb = cm.codebooks["blocks.0.attn.hook_z"]
    cb.cfg = cb.cfg.replace(dead_code_threshold=1.0, replace_every=1)
    train_codebooks(cm, batches(), config(), accelerator=acc)
    flat = torch.cat([p.detach().reshape(-1) for p in cm.parameters()])
    gathered = acc.gather(flat[None])
    same = bool((gathered == gathered[0]).all())
    if acc.is_main_process:
        run = {
            "num_processes": acc.num_processes,
            "device": acc.device.type,
            "distributed_type": str(acc.distributed_type),
            "history": res.history,
            "ranks_identical_after_replacement": same,
        }
        (out / "run.json").write_text(json.dumps(run))
    exit_processes(acc)  # no interpreter teardown: gloo can abort it


if __name__ == "__main__":
    main(Path(sys.argv[1]))
