"""What the integrity record costs at pythia-70m size (codebook_lens.integrity).

    python benchmarks/bench_integrity.py            # record/verify times, then save/load times

A native TransformerLens model shaped like pythia-70m (6 layers, d_model 512, 8 heads of 64,
d_mlp 2048, vocabulary 50,304, rotary; random float32 weights, about 70M parameters) with one
codebook of 1,000 codes. Reports the median of 5 runs of recording and of verifying its state
dict (SHA-256 of every tensor), of 3 runs of recording a training state three times that size
(the model plus AdamW's two moments, what a training checkpoint holds), and of 3 runs of
``CodebookModel.save(include_model=True)`` and ``CodebookModel.load``. One torch thread.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from codebook_lens import CodebookModel
from codebook_lens.backends import build_model
from codebook_lens.integrity import check_tensors, record_tensors

PYTHIA_70M = dict(
    n_layers=6, d_model=512, n_heads=8, d_head=64, d_mlp=2048, n_ctx=2048, d_vocab=50304,
    act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary", rotary_dim=16,
    seed=0,
)  # fmt: skip


def _median(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    model = build_model(PYTHIA_70M)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    mib = sum(v.numel() * v.element_size() for v in sd.values()) / 2**20
    n = sum(p.numel() for p in model.parameters())
    print(f"{n / 1e6:.1f}M parameters, state dict {mib:.0f} MiB")
    rec = record_tensors(sd)
    print(f"record: {_median(lambda: record_tensors(sd), 5):.3f} s")
    print(f"verify: {_median(lambda: check_tensors(sd, rec, Path('x')), 5):.3f} s")
    train = {**sd, **{f"m.{k}": v.clone() for k, v in sd.items()}}
    train |= {f"v.{k}": v.clone() for k, v in sd.items()}
    train_s = _median(lambda: record_tensors(train), 3)
    print(f"record a {3 * mib:.0f} MiB training state: {train_s:.3f} s")
    cm = CodebookModel(model)
    cm.add_codebook("blocks.0.hook_resid_post", n_codes=1000, k=8)
    d = Path(tempfile.mkdtemp())
    try:
        save = _median(lambda: cm.save(d / "ck", include_model=True, overwrite=True), 3)
        load = _median(lambda: CodebookModel.load(d / "ck"), 3)
        print(f"save (include_model=True): {save:.2f} s, load: {load:.2f} s")
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
