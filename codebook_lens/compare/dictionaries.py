"""The two kinds of dictionary compared, trained on the same frozen base model and tokens: a TopK
SAE trained by SAELens's own trainer, and a codebook trained by :func:`train_codebooks` with the
base model frozen (returned as a SAELens SAE, so that both are measured through one path)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import datasets
import torch
from jaxtyping import Int
from sae_lens import (
    SAE,
    HookedSAETransformer,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    TopKTrainingSAEConfig,
)
from safetensors.torch import save
from torch import Tensor, nn

from codebook_lens.atomic import write_file, write_text
from codebook_lens.model import CodebookModel
from codebook_lens.saelens import to_sae_lens
from codebook_lens.training import TrainConfig, train_codebooks
from codebook_lens.validation import Range, ValidatedConfig

__all__ = ["DictionarySpec", "as_sae_model", "save_sae", "site_width", "train_dictionary"]

Method = Literal["sae", "codebook"]


@dataclass
class DictionarySpec(ValidatedConfig):
    """One dictionary of the comparison."""

    RANGES: ClassVar[dict[str, Range]] = {
        "width": Range(1, 2**24),
        "k": Range(1, 2**16),
        "train_tokens": Range(1, 2**40),
        "seed": Range(-(2**62), 2**62),
        "lr": Range(0, 1, lo_open=True),
        "merge_threshold": Range(0, 1, hi_open=True),
    }
    """Bounds of the numeric fields."""

    method: Method
    """``"sae"`` (SAELens TopK SAE) or ``"codebook"`` (codebook on the frozen base model)."""

    site: str
    """Hook point; ``attn.hook_z`` sites are flattened over heads (one dictionary)."""

    width: int
    """Features (SAE ``d_sae``) or codes (codebook ``n_codes``)."""

    k: int
    """Active features (codes) per position."""

    train_tokens: int
    """Training tokens, the same for both methods."""

    seed: int = 0
    """Seed of the dictionary's initialisation and data order."""

    lr: float = 3e-3
    """Learning rate: Adam's for the SAE (SAELens's trainer; its default 3e-4 leaves a k=1
    SAE undertrained at 500k tokens), ``codebook_lr`` for the codes (the TokFSM demo's)."""

    merge_threshold: float = 0.85
    """Codebooks only: park a code whose cosine similarity to a more-used code exceeds this
    (the TokFSM demo's MLP setting; 0 disables)."""

    @property
    def name(self) -> str:
        """A short label, e.g. ``"sae w1000 k1"``."""
        return f"{self.method} w{self.width} k{self.k}"

    @property
    def dirname(self) -> str:
        """Where the comparison saves it, under its site: e.g. ``"sae-w1000-k1-seed0"``."""
        return f"{self.name.replace(' ', '-')}-seed{self.seed}"


def as_sae_model(model: nn.Module, tokenizer: Any = None) -> HookedSAETransformer:
    """``model`` (a HookedTransformer) as a HookedSAETransformer with the same weights (and
    ``tokenizer``, for sampling)."""
    out = HookedSAETransformer(model.cfg, tokenizer=tokenizer)
    out.load_state_dict(model.state_dict())
    return out.eval()


def save_sae(sae: SAE, path: Path) -> None:
    """``sae`` in SAELens's layout (``cfg.json`` + ``sae_weights.safetensors``, what
    ``SAE.load_from_disk`` reads), each file written atomically."""
    state = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    write_file(path / "sae_weights.safetensors", save(state))
    write_text(path / "cfg.json", json.dumps(sae.cfg.to_dict()))


def site_width(model: HookedSAETransformer, site: str) -> int:
    """The size of ``site``'s activation vector (heads flattened at ``attn.hook_z``)."""
    cfg = model.cfg
    if site.endswith("attn.hook_z"):
        return cfg.n_heads * cfg.d_head
    return cfg.d_mlp if site.endswith(("mlp.hook_post", "mlp.hook_pre")) else cfg.d_model


def train_dictionary(
    model: HookedSAETransformer, tokens: Int[Tensor, "seq pos"], spec: DictionarySpec
) -> SAE:
    """Train ``spec``'s dictionary on ``model`` (left unchanged) over ``tokens`` (taken in order,
    cycling if ``spec.train_tokens`` asks for more)."""
    if spec.method == "sae":
        return _train_sae(model, tokens, spec)
    return _train_codebook(model, tokens, spec)


_BATCH_TOKENS = 1024


def _train_sae(model: HookedSAETransformer, tokens: Tensor, spec: DictionarySpec) -> SAE:
    d_in, hook_z = site_width(model, spec.site), spec.site.endswith("attn.hook_z")
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_in, d_sae=spec.width, k=spec.k, reshape_activations="hook_z" if hook_z else "none"
    )
    ctx = tokens.shape[1]
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name="local", hook_name=spec.site, dataset_path="local",
        is_dataset_tokenized=True, streaming=False, context_size=ctx, prepend_bos=False,
        training_tokens=spec.train_tokens, train_batch_size_tokens=_BATCH_TOKENS,
        store_batch_size_prompts=32, n_batches_in_buffer=max(8, 4 * _BATCH_TOKENS // ctx),
        device="cpu", seed=spec.seed, lr=spec.lr, logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0, save_final_checkpoint=False, output_path=None, verbose=False,
        n_batches_for_norm_estimate=10,
    )  # fmt: skip
    data = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})
    torch.manual_seed(spec.seed)
    quiet = logging.getLogger("sae_lens")
    level, quiet.level = quiet.level, logging.CRITICAL  # override warnings, view fallback
    try:  # its progress bar ignores verbose=False
        with contextlib.redirect_stderr(io.StringIO()):
            runner = LanguageModelSAETrainingRunner(
                cfg, override_dataset=data, override_model=model
            )
            sae = runner.run()
    finally:
        quiet.setLevel(level)
    sae.cfg.metadata.hook_name = spec.site
    if hook_z:  # SAELens trains on flattened heads; the spliced SAE must flatten them itself
        sae.turn_on_forward_pass_hook_z_reshaping()
    return sae.eval()


def _train_codebook(model: HookedSAETransformer, tokens: Tensor, spec: DictionarySpec) -> SAE:
    hook_z = spec.site.endswith("attn.hook_z")
    cm = CodebookModel(model)
    fields = {"d_in": site_width(model, spec.site), "n_groups": 1} if hook_z else {}
    cm.add_codebook(
        spec.site, n_codes=spec.width, k=spec.k, seed=spec.seed,
        merge_threshold=spec.merge_threshold, **fields,
    )  # fmt: skip
    g = torch.Generator().manual_seed(spec.seed)
    order = tokens[torch.randperm(tokens.shape[0], generator=g)]
    cm.init_codebooks(order[: max(1, 4 * spec.width // tokens.shape[1] + 1)])
    with torch.no_grad():  # codes start as activations and the output sums k of them
        cm.codebooks[spec.site].codebook.div_(spec.k)
    batch = max(1, _BATCH_TOKENS // tokens.shape[1])
    steps = max(1, spec.train_tokens // (batch * tokens.shape[1]))
    cfg = TrainConfig(
        steps=steps, codebook_lr=spec.lr, freeze_model=True, warmup_steps=min(50, steps // 10),
        log_every=max(1, steps), progress=False,
    )  # fmt: skip

    def batches():
        while True:
            yield from order.split(batch)

    train_codebooks(cm, batches(), cfg)
    sae = to_sae_lens(cm.eval(), spec.site)
    cm.detach()
    return sae
