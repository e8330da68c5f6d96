"""CodebookModel forward throughput against its base model, and analysis throughput.

    python benchmarks/bench_model.py                   # medians of 5 alternated rounds
    python benchmarks/bench_model.py --tokens 1048576 --repeats 5

Part 1 runs a base model (``--backend``: hooked, bridge or auto), the base with hooks that
only run each codebook's bare scoring GEMM (the floor), and the same model with codebooks (a
separate copy, so the base carries no codebook hooks), on the same batches, alternated, eval
mode, no grad. Part 2 collects the codes of ``--tokens`` tokens into a ``CodeStore`` and runs
code-label attribution (precision, recall, F1 of every code for 100 labels, as TokFSM states)
and a token-feature attribution over them.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

from codebook_lens import CodebookModel, build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import alternate, load_line, median, paired_ratio, print_table  # noqa: E402

__all__ = ["MODELS", "main"]

# name -> (HookedTransformer config, codebooks: site suffix -> (n_codes, k))
MODELS = {
    "tokfsm": (
        dict(n_layers=4, d_model=128, n_heads=4, d_head=32, d_mlp=512, n_ctx=129, d_vocab=11),
        {"attn.hook_z": (1000, 1), "hook_mlp_out": (1000, 1)},
    ),
    "medium": (
        dict(n_layers=4, d_model=512, n_heads=8, d_head=64, d_mlp=2048, n_ctx=256, d_vocab=5000),
        {"attn.hook_z": (10_000, 1), "hook_mlp_out": (10_000, 8)},
    ),
}


def build(name: str, backend: str = "auto") -> tuple[torch.nn.Module, CodebookModel]:
    """The base model and a CodebookModel on an identical copy (codebooks at every layer)."""
    cfg, sites = MODELS[name]
    base = build_model({**cfg, "act_fn": "gelu", "normalization_type": "LN", "seed": 0}, backend)
    cm = CodebookModel(copy.deepcopy(base))
    for layer in range(cfg["n_layers"]):
        for suffix, (n_codes, k) in sites.items():
            cm.add_codebook(f"blocks.{layer}.{suffix}", n_codes=n_codes, k=k)
    return base, cm.eval()


def _gemm_floor_hooks(cm: CodebookModel) -> list:
    """Hooks that only run each codebook's bare scoring GEMM (``bmm`` against its codes) at its
    site and leave the activation alone: the base model plus the unavoidable codebook work."""

    def hook_for(cb):
        w_t = cb.codebook.detach().transpose(1, 2)

        def hook(act, hook):
            x = act.reshape(-1, cb.cfg.n_groups, cb.cfg.d_in).transpose(0, 1)
            torch.bmm(x, w_t)

        return hook

    return [(site, hook_for(cb)) for site, cb in cm.codebooks.items()]


def _runners(base: torch.nn.Module, cm: CodebookModel, toks: torch.Tensor) -> dict:
    floor_hooks = _gemm_floor_hooks(cm)

    @torch.no_grad()
    def run_base():
        return base(toks, return_type="logits")

    @torch.no_grad()
    def run_floor():
        return base.run_with_hooks(toks, return_type="logits", fwd_hooks=floor_hooks)

    @torch.no_grad()
    def run_cm():
        return cm(toks, return_type="logits")

    return {"base": run_base, "floor": run_floor, "cm": run_cm}


def forward_table(
    names: list[str], batch: int, seq: int, repeats: int, backend: str = "auto"
) -> None:
    rows = []
    for name in names:
        base, cm = build(name, backend)
        seq_n = min(seq, base.cfg.n_ctx)
        toks = torch.randint(0, base.cfg.d_vocab, (batch, seq_n), generator=torch.Generator())
        n_tok = batch * seq_n
        times = alternate(_runners(base, cm, toks), repeats)
        b, f, c = times["base"], times["floor"], times["cm"]
        sites = ", ".join(f"{s} N={n} k={k}" for s, (n, k) in MODELS[name][1].items())
        rows.append(
            [name, sites, f"{n_tok / median(b):,.0f}", f"{n_tok / median(f):,.0f}",
             f"{n_tok / median(c):,.0f}", f"{paired_ratio(c, b):.2f}x",
             f"{paired_ratio(c, f):.2f}x"]
        )  # fmt: skip
    print_table(
        ["model", "codebooks (every layer)", "base tok/s", "base + GEMMs tok/s",
         "codebooks tok/s", "time vs base", "vs base + GEMMs"],
        rows,
    )  # fmt: skip


def analysis_table(n_tokens: int, batch: int, repeats: int, backend: str = "auto") -> None:
    from codebook_lens import analysis

    _, cm = build("tokfsm", backend)
    seq = cm.model.cfg.n_ctx - 1
    n_seq = -(-n_tokens // seq)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, cm.model.cfg.d_vocab, (n_seq, seq), generator=g)
    labels = torch.randint(-1, 100, (n_seq, seq), generator=g)  # 100 states, -1 = ignore
    t0 = time.perf_counter()
    store = analysis.collect_codes(cm, toks, batch_size=batch, progress=False)
    t_collect = time.perf_counter() - t0
    sites = store.sites
    feature = analysis.token_feature(store, [3, 7])

    def attribute():
        return analysis.attribution_by_site(store, labels, sites, n_labels=100)

    def feat():
        return [analysis.feature_attribution(store, feature, s) for s in sites]

    times = alternate({"labels": attribute, "feature": feat}, repeats)
    n = store.n_tokens
    rows = [
        ["collect_codes (model forward + store)", len(sites), f"{t_collect:.2f}",
         f"{n / t_collect:,.0f}"],
        ["label_attribution, 100 labels", len(sites), f"{median(times['labels']):.2f}",
         f"{n / median(times['labels']):,.0f}"],
        ["feature_attribution, token feature", len(sites), f"{median(times['feature']):.2f}",
         f"{n / median(times['feature']):,.0f}"],
    ]  # fmt: skip
    print(f"\n{n:,} tokens, store {store.nbytes / 2**20:.1f} MiB")
    print_table(["step (all sites)", "sites", "seconds", "tokens / s"], rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2**20, help="tokens for the analysis part")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--backend", choices=["auto", "hooked", "bridge"], default="auto")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {load_line()}\n")
    forward_table(args.models, args.batch, args.seq, args.repeats, args.backend)
    if args.tokens > 0:
        analysis_table(args.tokens, 256, args.repeats, args.backend)


if __name__ == "__main__":
    main()
