"""One finetuning step with codebooks against the base model's step and the reference's step.

    python benchmarks/bench_train.py                        # ours vs base (+ reference if found)
    python benchmarks/bench_train.py --repeats 5 --ref-python /work/refvenv/bin/python
    python benchmarks/bench_train.py --threads 1 --clock cpu    # CPU seconds: a busy machine
    python benchmarks/bench_train.py --profile              # torch.profiler table of our step
    python benchmarks/bench_train.py --device cuda          # ours only, where a GPU exists

The model is pythia-70m-shaped (GPT-NeoX: 6 layers, d_model 512, 8 heads of 64, d_mlp 2048,
vocabulary 50,304 unless ``--vocab``), built with ``transformers.GPTNeoXConfig`` with random
weights, saved with ``save_pretrained`` to a temporary directory and booted from there with
``codebook_lens.boot_hf``. A step is what ``codebook_lens.training.train_codebooks`` does per
optimizer step (``_train_step`` + ``_micro_step``, one micro-batch): zero the gradients, task
loss plus the codebooks' aux loss, backward, clip the gradient norm to 1, AdamW step; train mode,
codebooks and model both trained. Batches of 8 x 128 random tokens; codebooks of 10,000 codes
per head, k=8, at every layer's ``attn.hook_z``, with the default ``CodebookConfig`` (cosine,
``input_norm="none"``).

The reference (codebook-features 0.1.2) runs the same step on the same weights and tokens:
``wrap_codebook`` with ``attn_preproj`` group codebooks (one per head) of the same size, as in its
own ``config/main.yaml`` (``inner_product``, ``aeloss``), and AdamW over codebook and model
parameters as its ``train_codebook.get_optimizer`` builds it. It pins transformer-lens 1.7.0 and
does not import on this project's stack, so it runs in a child process in its own venv, which
this script talks to over stdin/stdout so that all four steps (our base, ours, the reference's
base, the reference's) alternate within each round. Set that venv up once, outside the repo::

    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0          # the CPU build on disk, never a CUDA one
    /work/refvenv/bin/pip install "numpy<2" transformers==4.33.3 tokenizers==0.13.3 einops \\
        fancy_einsum "jaxtyping<0.2.30" "typeguard<3" "datasets<3" "pyarrow<17" rich pandas \\
        tqdm scikit-learn termcolor safetensors wandb
    /work/refvenv/bin/pip install --no-deps transformer-lens==1.7.0 codebook-features==0.1.2

(``--no-deps``: transformer-lens 1.7.0 pins CUDA wheels and triton.) Without that venv the
script says why and reports ours against our base only.

Times are medians over ``--repeats`` rounds after one warm-up round; every ratio is the median
of per-round ratios (steps of one round are neighbours in time). The machine is shared, so the
load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import alternate, load_line, print_table  # noqa: E402

__all__ = ["main"]

BATCH, SEQ = 8, 128
N_CODES, K = 10_000, 8
LR = 1e-3  # TrainConfig's default
SHAPE = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048)
REF_PYTHON = "/work/refvenv/bin/python"


def _neox_kwargs(vocab: int) -> dict:
    """GPTNeoXConfig arguments of pythia-70m's shape, understood by transformers 4.33 and 5.x."""
    return dict(
        vocab_size=vocab, max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
        use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        **SHAPE,
    )  # fmt: skip


def _adamw(codebook_params: list, model_params: list, fused: bool) -> torch.optim.Optimizer:
    """AdamW over codebooks (no weight decay) and model, as both libraries build it (torch's
    default implementation; ``fused`` for the single-kernel one, not what they use)."""
    groups = [{"params": model_params, "lr": LR, "weight_decay": 0.0}]
    if codebook_params:
        groups.insert(0, {"params": codebook_params, "lr": LR, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=LR, fused=fused or None)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _stepper(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    batches: list[torch.Tensor],
    clock: Callable[[], float],
) -> Callable[[], float]:
    """One training step on the next batch; returns its seconds on ``clock``."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {"i": 0}

    def step() -> float:
        tokens = batches[state["i"] % len(batches)]
        state["i"] += 1
        t0 = clock()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if tokens.is_cuda:
            torch.cuda.synchronize()
        return clock() - t0

    return step


# --------------------------------------------------------------------------- the reference child
def _ref_models(model_dir: Path, args: argparse.Namespace) -> dict[str, Callable[[], float]]:
    """The reference's base and codebook steps (runs inside the reference venv)."""
    import transformers
    from codebook_features import models
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    if "lm_head.weight" in weights:  # transformers 5 may save either name
        weights["embed_out.weight"] = weights.pop("lm_head.weight")
    batches = list(load_file(str(model_dir / "tokens.safetensors"))["tokens"])
    cfg = transformers.GPTNeoXConfig(**_neox_kwargs(args.vocab))

    def hf_model() -> torch.nn.Module:
        torch.manual_seed(0)
        m = transformers.GPTNeoXForCausalLM(cfg)
        missing, unexpected = m.load_state_dict(weights, strict=False)
        assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
        return m.train()

    base = hf_model()
    with torch.no_grad():
        loss0 = float(base.eval()(input_ids=batches[0], labels=batches[0]).loss)
    base.train()
    cb_cfg = models.CodebookModelConfig(
        codebook_type="group", num_codes=N_CODES, num_codebooks=-1, layers_to_snap="all",
        similarity_metric="inner_product", codebook_at="attn_preproj", loss="aeloss",
        k_codebook=K,
    )  # fmt: skip
    cbm = models.wrap_codebook(hf_model(), config=cb_cfg).train()
    fused, clock = args.fused_adamw, CLOCKS[args.clock]
    base_opt = _adamw([], list(base.parameters()), fused)
    base_step = _stepper(lambda t: base(input_ids=t, labels=t).loss, base_opt, batches, clock)
    cb_opt = _adamw(list(cbm.get_codebook_params()), list(cbm.get_model_params()), fused)
    cb_step = _stepper(lambda t: cbm(input_ids=t, labels=t).loss, cb_opt, batches, clock)
    print(json.dumps({"ready": True, "loss0": loss0, "transformers": transformers.__version__}))
    return {"base": base_step, "codebooks": cb_step}


def _ref_child(args: argparse.Namespace) -> None:
    """Serve steps: read a case name per line, print its seconds as JSON."""
    import warnings

    warnings.simplefilter("ignore")
    steps = _ref_models(Path(args.ref_child), args)
    sys.stdout.flush()
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            break
        print(json.dumps({"seconds": steps[name]()}), flush=True)


class _Reference:
    """The reference's steps in a child process of the reference venv."""

    def __init__(self, model_dir: Path, args: argparse.Namespace):
        cmd = [args.ref_python, __file__, "--ref-child", str(model_dir), "--vocab", str(args.vocab)]
        cmd += ["--threads", str(args.threads), "--clock", args.clock]
        cmd += ["--fused-adamw"] if args.fused_adamw else []
        self.err = tempfile.TemporaryFile(mode="w+")  # not a pipe: a full one would block it
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True
        )
        self.info = self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.proc.wait(timeout=60)
        self.err.seek(0)
        raise RuntimeError(f"reference child failed:\n{self.err.read()[-3000:]}")

    def step(self, name: str) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self.err.close()


def _start_reference(args, model_dir: Path) -> tuple[_Reference | None, str]:
    """The reference child, or None and the reason it is not run."""
    if args.device != "cpu":
        return None, "the reference venv has a CPU-only torch; run on --device cpu to compare"
    if not Path(args.ref_python).exists():
        return None, f"{args.ref_python} does not exist (set up the venv, see the docstring)"
    try:
        return _Reference(model_dir, args), ""
    except (RuntimeError, OSError) as e:
        return None, f"the reference did not start: {e}"


# --------------------------------------------------------------------------- ours
def _save_model(model_dir: Path, vocab: int, n_batches: int) -> None:
    """Random pythia-70m-shaped weights, a tiny tokenizer (boot_hf loads one) and the tokens."""
    import tokenizers
    import transformers
    from safetensors.torch import save

    from codebook_lens.atomic import write_file

    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(**_neox_kwargs(vocab))
    ).save_pretrained(model_dir)
    chars = {chr(33 + i): i for i in range(90)} | {"<unk>": 90}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(chars, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>", bos_token="<unk>"
    ).save_pretrained(model_dir)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (n_batches, BATCH, SEQ), generator=g)
    write_file(model_dir / "tokens.safetensors", save({"tokens": tokens}))


def _our_models(
    model_dir: Path, args: argparse.Namespace
) -> tuple[dict[str, Callable[[], float]], float]:
    """Our base and codebook steps, and the base model's loss on the first batch."""
    from safetensors.torch import load_file

    from codebook_lens import CodebookModel, boot_hf

    device = args.device
    batches = [t.to(device) for t in load_file(str(model_dir / "tokens.safetensors"))["tokens"]]
    base = boot_hf(model_dir).to(device)
    with torch.no_grad():
        loss0 = float(base(batches[0], return_type="loss"))
    cm = CodebookModel(boot_hf(model_dir))
    for layer in range(SHAPE["num_hidden_layers"]):
        cm.add_codebook(f"blocks.{layer}.attn.hook_z", n_codes=N_CODES, k=K)
    cm.to(device).train()
    base.train()

    def cb_loss(tokens: torch.Tensor) -> torch.Tensor:
        loss = cm(tokens, return_type="loss") + cm.aux_loss()
        # _micro_step also sums the codebooks' recon terms for its log (a few scalar ops)
        torch.stack([c.last_losses["recon"] for c in cm.codebooks.values()]).mean()
        return loss

    fused, clock = args.fused_adamw, CLOCKS[args.clock]
    base_opt = _adamw([], list(base.parameters()), fused)
    cb_opt = _adamw(list(cm.codebook_parameters()), list(cm.model.parameters()), fused)
    steps = {
        "base": _stepper(lambda t: base(t, return_type="loss"), base_opt, batches, clock),
        "codebooks": _stepper(cb_loss, cb_opt, batches, clock),
    }
    return steps, loss0


def _profile(step: Callable[[], float], rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _ratio(a: list[float], b: list[float]) -> str:
    per_round = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"


def _report(times: dict[str, list[float]], why_no_ref: str) -> None:
    tok = BATCH * SEQ
    rows = [
        [
            n,
            f"{statistics.median(t):.3f}",
            f"{min(t):.3f}-{max(t):.3f}",
            f"{tok / statistics.median(t):,.0f}",
        ]
        for n, t in times.items()
    ]
    print_table(["step", "median s", "range s", "tokens/s"], rows)
    print()
    print("ours / our base:", _ratio(times["ours: codebooks"], times["ours: base"]))
    if "reference: codebooks" in times:
        ref, ref_base = times["reference: codebooks"], times["reference: base"]
        print("reference / its base:", _ratio(ref, ref_base))
        print("reference / ours (speed-up):", _ratio(ref, times["ours: codebooks"]))
        print("reference base / our base:", _ratio(ref_base, times["ours: base"]))
    else:
        print(f"reference not run: {why_no_ref}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--vocab", type=int, default=50_304)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ref-python", default=REF_PYTHON, help="python of the reference's venv")
    p.add_argument("--no-ref", action="store_true", help="skip the reference")
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall: elapsed seconds; cpu: this process's CPU seconds (steadier on a shared "
        "machine with --threads 1; with more threads it counts every thread's time)",
    )
    p.add_argument("--fused-adamw", action="store_true", help="torch's fused AdamW (both sides)")
    p.add_argument("--profile", action="store_true", help="profile our codebook step and exit")
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--ref-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    if args.ref_child:
        return _ref_child(args)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.device}")
    print(f"before: {load_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        _save_model(model_dir, args.vocab, n_batches=2)
        ours, loss0 = _our_models(model_dir, args)
        if args.profile:
            return _profile(ours["codebooks"], args.profile_rows)
        ref, why = (None, "--no-ref") if args.no_ref else _start_reference(args, model_dir)
        cases = {"ours: base": ours["base"], "ours: codebooks": ours["codebooks"]}
        if ref is not None:
            print(f"same weights: base loss {loss0:.5f} (ours), {ref.info['loss0']:.5f} (ref.)")
            cases["reference: base"] = lambda: ref.step("base")
            cases["reference: codebooks"] = lambda: ref.step("codebooks")
        try:
            times = alternate(cases, args.repeats, self_timed=True)
        finally:
            if ref is not None:
                ref.close()
    print(f"after: {load_line()}")
    _report(times, why)


if __name__ == "__main__":
    main()
