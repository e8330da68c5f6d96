"""The TokFSM experiment end to end: base model, codebooks, state recovery, interventions.

Each step is a function so that the CLI, the tutorials and the tests share one implementation:
:func:`get_base_model` (trained once, then cached), :func:`attach_codebooks`,
:func:`finetune_codebooks`, :func:`state_recovery`, :func:`interventions`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from codebook_lens.analysis import (
    AttributionResult,
    CodeStore,
    best_codes_per_label,
    collect_activations,
    collect_codes,
    label_attribution,
    neuron_baseline,
    recovered_labels,
)
from codebook_lens.atomic import write_text
from codebook_lens.backends import Backend
from codebook_lens.config import CodebookConfig, InputNorm
from codebook_lens.fsm.base_model import BaseTrainConfig, base_model_config, train_base_model
from codebook_lens.fsm.data import (
    TokFSMStream,
    eval_set,
    sample_walks_ending_in,
    state_labels,
    walks_to_tokens,
)
from codebook_lens.fsm.machine import FSM
from codebook_lens.fsm.metrics import (
    append_digit_prefixes,
    evaluate_transition_accuracy,
    jsd,
    next_state_distribution,
    true_next_state_distribution,
)
from codebook_lens.model import CodebookModel, codes_hook_name
from codebook_lens.training import TrainConfig, TrainResult, train_codebooks
from codebook_lens.validation import Range, ValidatedConfig

__all__ = [
    "CodebookPlan",
    "ExperimentConfig",
    "Placement",
    "StateRecovery",
    "attach_codebooks",
    "cached_codebook_model",
    "clone_model",
    "codebook_cache_path",
    "finetune_codebooks",
    "get_base_model",
    "init_codebooks",
    "intervention_success",
    "interventions",
    "site_sets",
    "state_recovery",
    "transition_accuracy_of",
]


Placement = Literal["attn", "mlp", "attn+mlp"]
"""Where :func:`attach_codebooks` puts codebooks."""

_SEED = Range(-(2**62), 2**62)
"""Seeds: 64-bit, with room for the per-stream offsets added to them."""


@dataclass
class CodebookPlan(ValidatedConfig):
    """Where codebooks go in the TokFSM model and how they are trained (tuning notes:
    ``docs/results/tokfsm.md``).

    Ranges (:attr:`RANGES`): code counts as :class:`~codebook_lens.config.CodebookConfig`'s
    ``n_codes``, ``1 <= k <= `` the code count of each placed codebook, merge thresholds (cosine
    similarities) in ``[0, 1)``."""

    RANGES: ClassVar[dict[str, Range]] = {
        "attn_codes": Range(1, 2**31 - 1),
        "mlp_codes": Range(1, 2**31 - 1),
        "k": Range(1, 2**16),
        "dead_code_threshold": Range(0, 2**53),
        "mlp_merge_threshold": Range(0, 1, hi_open=True),
        "attn_merge_threshold": Range(0, 1, hi_open=True),
        "replace_every": Range(1, 10**9),
    }
    """Bounds of the numeric fields (those of the :class:`~codebook_lens.config.CodebookConfig`
    fields they set)."""

    placement: Placement = "attn+mlp"
    """``"attn"`` (per-head codebooks at every ``attn.hook_z``), ``"mlp"`` (every
    ``hook_mlp_out``) or ``"attn+mlp"`` (both; the default)."""

    attn_codes: int = 1000
    """Codes per head at ``attn.hook_z``."""

    mlp_codes: int = 1000
    """Codes at ``hook_mlp_out``."""

    k: int = 1
    """Active codes per position (and head)."""

    attn_input_norm: InputNorm = "none"
    """``input_norm`` of the attention codebooks."""

    mlp_input_norm: InputNorm = "layernorm"
    """``input_norm`` of the MLP codebooks: normalising keeps their training stable (without
    it code norms grow unchecked under cosine selection and finetuning diverges)."""

    dead_code_threshold: float = 0.0
    """Re-seed codes used fewer times than this per ``replace_every`` steps (0: never, the
    default). Re-seeding puts new codes where activations are dense, which splits a state over
    several codes."""

    mlp_merge_threshold: float = 0.85
    """``merge_threshold`` of the MLP codebooks: every ``replace_every`` steps, a used code whose
    cosine similarity to a more-used code exceeds this is parked, so its positions join that
    code (0: never). Without merging, a state's activations, stretched along position, can stay
    split between two codes of high precision and lower recall each."""

    attn_merge_threshold: float = 0.0
    """``merge_threshold`` of the attention codebooks (0: never, the default)."""

    replace_every: int = 100
    """Steps between codebook maintenance rounds (dead-code replacement, merging)."""

    def validate(self) -> None:
        """``k`` at most the code count of each codebook placed (the :attr:`RANGES` are checked
        before this runs)."""
        for kind in ("attn", "mlp"):
            codes = getattr(self, f"{kind}_codes")
            if kind in self.placement and self.k > codes:
                raise ValueError(
                    f"CodebookPlan: k={self.k} exceeds {kind}_codes={codes}; choose k <= "
                    f"{kind}_codes (or place no {kind} codebooks)"
                )


@dataclass
class ExperimentConfig(ValidatedConfig):
    """Every setting of the TokFSM demo (the defaults are the tuned, shipped ones; measured
    results: ``docs/results/tokfsm.md``).

    Ranges (:attr:`RANGES`): ``1 <= n_edges <= n_states <= 2**16`` (the dense transition matrix
    has ``n_states**2`` entries), every count of walks, prompts or states at least 1."""

    RANGES: ClassVar[dict[str, Range]] = {
        "n_states": Range(1, 2**16),
        "n_edges": Range(1, 2**16),  # <= n_states: validate()
        "fsm_seed": _SEED,
        "batch_size": Range(1, 2**20),
        "walk_states": Range(1, 2**16),
        "eval_prompts": Range(1, 2**20),
        "eval_prompt_states": Range(1, 2**16),
        "eval_new_states": Range(1, 2**16),
        "recovery_walks": Range(1, 2**20),
        "recovery_states": Range(1, 2**16),
        "intervention_prompts": Range(1, 2**16),
        "intervention_prompt_states": Range(1, 2**16),
        "seed": _SEED,
    }
    """Bounds of the numeric fields."""

    n_states: int = 100
    """FSM states."""
    n_edges: int = 10
    """Successors per state."""
    fsm_seed: int = 0
    """Seed of the FSM's edges."""
    base: BaseTrainConfig = field(default_factory=BaseTrainConfig)
    """Base model architecture and training (the tuned :class:`BaseTrainConfig` defaults)."""
    plan: CodebookPlan = field(default_factory=CodebookPlan)
    """Codebook placement."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=1500, lr=1e-3, codebook_lr=3e-3, warmup_steps=50, log_every=50
        )
    )
    """Codebook finetuning (the base model is finetuned along with the codes, at a third of the
    codes' learning rate): 1500 steps, ``lr=1e-3``, ``codebook_lr=3e-3``, 50 warm-up steps."""
    batch_size: int = 32
    """Walks per finetuning batch."""
    walk_states: int = 32
    """States per finetuning walk."""
    eval_prompts: int = 256
    """Prompts for transition accuracy."""
    eval_prompt_states: int = 8
    """States per accuracy prompt."""
    eval_new_states: int = 24
    """States sampled after each accuracy prompt."""
    recovery_walks: int = 512
    """Walks whose codes are matched against the true states."""
    recovery_states: int = 32
    """States per recovery walk."""
    intervention_prompts: int = 5
    """Prompts per target state in the intervention experiment."""
    intervention_prompt_states: int = 8
    """States per intervention prompt."""
    seed: int = 0
    """Seed of codebook initialisation and data streams."""
    backend: Backend = "auto"
    """TransformerLens backend of the base model: ``"auto"`` (the default), ``"hooked"`` or
    ``"bridge"`` (:func:`~codebook_lens.backends.resolve_backend`)."""

    def validate(self) -> None:
        """``n_edges <= n_states`` (the :attr:`RANGES` are checked before this runs)."""
        if self.n_edges > self.n_states:
            raise ValueError(
                f"ExperimentConfig: n_edges={self.n_edges} exceeds n_states={self.n_states}; "
                "each state's successors are distinct states, so choose n_edges <= n_states"
            )

    @classmethod
    def small(cls) -> ExperimentConfig:
        """A seconds-long configuration for smoke tests and CI-sized tutorials."""
        return cls(
            n_states=20,
            n_edges=4,
            base=BaseTrainConfig(
                n_layers=1,
                d_model=32,
                n_heads=2,
                d_mlp=64,
                n_ctx=33,
                steps=60,
                batch_size=16,
                walk_states=16,
                lr=3e-3,
                warmup_steps=5,
                eval_prompts=16,
                eval_prompt_states=4,
                eval_new_states=4,
            ),  # fmt: skip
            plan=CodebookPlan(attn_codes=32, mlp_codes=32, replace_every=10),
            train=TrainConfig(steps=30, lr=3e-3, warmup_steps=5, log_every=10, progress=False),
            batch_size=16,
            walk_states=16,
            eval_prompts=16,
            eval_prompt_states=4,
            eval_new_states=4,
            recovery_walks=32,
            recovery_states=8,
            intervention_prompts=2,
            intervention_prompt_states=4,
        )


# ---------------------------------------------------------------------------- base model
def _base_key(cfg: ExperimentConfig) -> str:
    spec = {
        "n_states": cfg.n_states, "n_edges": cfg.n_edges, "fsm_seed": cfg.fsm_seed,
        "base": cfg.base.to_dict(),
    }  # fmt: skip
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def get_base_model(
    fsm: FSM, cfg: ExperimentConfig, cache_dir: Path | None = None, progress: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained base model for ``cfg``, from ``cache_dir`` when a matching one is there.

    Returns ``(model, info)``; ``info`` has ``cached``, ``train_seconds`` and the training
    history. The cache key hashes the FSM and base-training settings.
    """
    path = None if cache_dir is None else Path(cache_dir) / f"tokfsm-base-{_base_key(cfg)}"
    if path is not None and (path / "cfg.json").exists():
        model = CodebookModel.load(path, backend=cfg.backend).detach()
        info = json.loads((path / "train_info.json").read_text())
        return model, {**info, "cached": True}
    mcfg = base_model_config(
        fsm, cfg.base.n_layers, cfg.base.d_model, cfg.base.n_heads, cfg.base.d_mlp,
        cfg.base.n_ctx, seed=cfg.base.seed,
    )  # fmt: skip
    t0 = time.perf_counter()
    model, history = train_base_model(
        fsm, mcfg, progress=progress, train_cfg=cfg.base, backend=cfg.backend
    )
    info = {"train_seconds": time.perf_counter() - t0, "history": history}
    if path is not None:
        CodebookModel(model).save(path, include_model=True)
        write_text(path / "train_info.json", json.dumps(info))
    return model.eval(), {**info, "cached": False}


# ---------------------------------------------------------------------------- codebooks
def attach_codebooks(model: nn.Module, plan: CodebookPlan, seed: int = 0) -> CodebookModel:
    """A :class:`CodebookModel` on ``model`` with codebooks at the sites of ``plan``."""
    if plan.placement not in ("attn", "mlp", "attn+mlp"):
        raise ValueError(f"placement={plan.placement!r}; choose 'attn', 'mlp' or 'attn+mlp'")
    cm = CodebookModel(model)
    n_layers, n_heads, d_head = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    for layer in range(n_layers):
        common = dict(
            k=plan.k, dead_code_threshold=plan.dead_code_threshold,
            replace_every=plan.replace_every, seed=seed + layer,
        )  # fmt: skip
        if "attn" in plan.placement:
            cm.add_codebook(
                f"blocks.{layer}.attn.hook_z",
                CodebookConfig(
                    d_in=d_head,
                    n_groups=n_heads,
                    n_codes=plan.attn_codes,
                    input_norm=plan.attn_input_norm,
                    merge_threshold=plan.attn_merge_threshold,
                    **common,
                ),  # fmt: skip
            )
        if "mlp" in plan.placement:
            cm.add_codebook(
                f"blocks.{layer}.hook_mlp_out",
                CodebookConfig(
                    d_in=model.cfg.d_model,
                    n_codes=plan.mlp_codes,
                    input_norm=plan.mlp_input_norm,
                    merge_threshold=plan.mlp_merge_threshold,
                    **common,
                ),  # fmt: skip
            )
    return cm


def transition_accuracy_of(
    model: nn.Module, fsm: FSM, cfg: ExperimentConfig
) -> tuple[float, Int[Tensor, "batch pos"]]:
    """Transition accuracy of sampled continuations (and the sampled tokens)."""
    return evaluate_transition_accuracy(
        model, fsm, cfg.eval_prompts, cfg.eval_prompt_states, cfg.eval_new_states,
        seed=cfg.seed + 777,
    )  # fmt: skip


def init_codebooks(cm: CodebookModel, fsm: FSM, cfg: ExperimentConfig) -> None:
    """Initialise the codes from base-model activations on 256 held-out walks."""
    cm.init_codebooks(eval_set(fsm, 256, cfg.walk_states, seed=cfg.seed + 1))


def finetune_codebooks(cm: CodebookModel, fsm: FSM, cfg: ExperimentConfig) -> TrainResult:
    """Finetune with task + reconstruction loss (initialise the codes first), logging
    transition accuracy on a small prompt set at every log step."""
    stream = TokFSMStream(fsm, cfg.batch_size, cfg.walk_states, seed=cfg.seed + 2)

    def eval_fn(m: CodebookModel) -> dict[str, float]:
        acc, _ = evaluate_transition_accuracy(m, fsm, 64, cfg.eval_prompt_states, 8, seed=99)
        return {"transition_accuracy": acc}

    tcfg = dataclasses.replace(cfg.train, eval_every=cfg.train.eval_every or cfg.train.log_every)
    return train_codebooks(cm, stream, tcfg, eval_fn=eval_fn)


# ---------------------------------------------------------------------------- recovery
@dataclass
class StateRecovery:
    """What :func:`state_recovery` found: the metrics (:meth:`metrics`, the JSON part) and the
    attribution results, code store and state labels behind them."""

    states_recovered: int
    """States with some code at precision and recall >= 0.9."""
    states_present: int
    """States that occur in the recovery walks."""
    mean_best_code_precision: float
    """Mean over present states of the precision of the state's best code (by F1)."""
    mean_best_code_recall: float
    """Mean over present states of the recall of the state's best code."""
    mean_best_neuron_precision: float
    """Mean over present states of the best single neuron's precision at that recall."""
    mean_best_neuron_recall: float
    """Mean over present states of the best neuron's recall."""
    states_recovered_per_site: dict[str, int]
    """``states_recovered`` counted at each site alone."""
    best_code: dict[str, list[Any]]
    """Per state: ``site``, ``head``, ``code``, ``precision`` and ``recall`` of its best code."""
    best_neuron_precision: list[float]
    """Per state: the best neuron's precision at the best code's recall."""
    results: dict[str, AttributionResult]
    """Per site: precision and recall of every (head, code) for every state."""
    store: CodeStore
    """The codes of the recovery walks."""
    labels: Int[Tensor, "walks pos"]
    """The state at each state's last digit, -1 elsewhere."""

    def metrics(self) -> dict[str, Any]:
        """The JSON-ready metrics (every field but ``results``, ``store`` and ``labels``)."""
        skip = ("results", "store", "labels")
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }

    to_dict = metrics


def codebook_cache_path(cfg: ExperimentConfig, cache_dir: str | os.PathLike[str]) -> Path:
    """Where :func:`cached_codebook_model` keeps the finetuned model of ``cfg``: a directory in
    ``cache_dir`` named by a hash of every setting of ``cfg``."""
    key = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"tutorial-tokfsm-codebooks-{key}"


def cached_codebook_model(
    fsm: FSM,
    cfg: ExperimentConfig,
    cache_dir: str | os.PathLike[str],
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[CodebookModel, nn.Module]:
    """The finetuned codebook model of ``cfg`` (in eval mode) and its base model: loaded from
    :func:`codebook_cache_path` when there, else attached to a clone of the base model,
    initialised, finetuned (as the demo does) and saved there."""
    base, _ = get_base_model(fsm, cfg, cache_dir, progress=progress)
    path = codebook_cache_path(cfg, cache_dir)
    if (path / "cfg.json").exists():
        log(f"loading the finetuned codebooks from {path}")
        return CodebookModel.load(path, backend=cfg.backend).eval(), base
    log(f"no finetuned codebooks in {path}: finetuning now")
    cm = attach_codebooks(clone_model(base), cfg.plan, seed=cfg.seed)
    init_codebooks(cm, fsm, cfg)
    finetune_codebooks(cm, fsm, cfg)
    cm.save(path, include_model=True)
    return cm.eval(), base


def state_recovery(
    cm: CodebookModel,
    base_model: nn.Module,
    fsm: FSM,
    cfg: ExperimentConfig,
    progress: bool = False,
) -> StateRecovery:
    """Codes as detectors of the current FSM state, against the best single neuron.

    Positions are each state's last digit. For every site, head and code: precision and recall
    for each state. ``states_recovered`` counts states with some code at precision and recall
    >= 0.9. Each state's best code (by F1) is compared with the best single MLP neuron
    (``mlp.hook_post`` of every layer of the *base* model) at recall >= the code's recall.
    """
    tokens = eval_set(fsm, cfg.recovery_walks, cfg.recovery_states, seed=cfg.seed + 3)
    labels = state_labels(fsm, tokens)
    store = collect_codes(cm, tokens, progress=progress)
    results = {s: label_attribution(store, labels, s, n_labels=fsm.n_states) for s in cm.sites}
    recovered = recovered_labels(results)
    best = best_codes_per_label(results, by="f1")
    acts = torch.cat(
        [
            collect_activations(base_model, tokens, f"blocks.{layer}.mlp.hook_post")
            for layer in range(base_model.cfg.n_layers)
        ],
        dim=-1,
    )
    neurons = neuron_baseline(acts, labels, best.recall, n_labels=fsm.n_states)
    present = results[cm.sites[0]].label_counts > 0
    return StateRecovery(
        states_recovered=int(recovered.sum()),
        states_present=int(present.sum()),
        mean_best_code_precision=float(best.precision[present].mean()),
        mean_best_code_recall=float(best.recall[present].mean()),
        mean_best_neuron_precision=float(neurons.precision[present].mean()),
        mean_best_neuron_recall=float(neurons.recall[present].mean()),
        states_recovered_per_site={s: int(recovered_labels(r).sum()) for s, r in results.items()},
        best_code={
            "site": best.site,
            "head": best.head.tolist(),
            "code": best.code.tolist(),
            "precision": best.precision.tolist(),
            "recall": best.recall.tolist(),
        },
        best_neuron_precision=neurons.precision.tolist(),
        results=results,
        store=store,
        labels=labels,
    )


# ---------------------------------------------------------------------------- interventions
def site_sets(cm: CodebookModel) -> dict[str, list[str]]:
    """Each layer's attention, each layer's MLP, and all sites."""
    sets: dict[str, list[str]] = {}
    for s in cm.sites:
        layer = s.split(".")[1]
        kind = "attn" if "attn" in s else "mlp"
        sets[f"L{layer} {kind}"] = [s]
    sets["all"] = list(cm.sites)
    return sets


def _codes_from(
    cm: CodebookModel, tokens: Tensor, sites: list[str], start: int, batch_size: int = 2048
) -> dict[str, Tensor]:
    """Per site, the codes ``cm`` picks on ``tokens`` at positions ``start:``."""
    got: dict[str, list[Tensor]] = {s: [] for s in sites}

    def grab(site: str):
        def hook(codes: Tensor, hook: Any) -> None:
            got[site].append(codes[:, start:].clone())

        return hook

    hooks = [(codes_hook_name(s), grab(s)) for s in sites]
    for i in range(0, tokens.shape[0], batch_size):
        cm.run_with_hooks(tokens[i : i + batch_size], fwd_hooks=hooks)
    return {s: torch.cat(c) for s, c in got.items()}


def _forced_model(cm: CodebookModel, forced: dict[str, list[Tensor]], pos: int):
    """A callable running ``cm`` with codes forced from position ``pos`` on, per row.

    ``forced[site][j]`` (``[rows, width, *code_shape]``) is written at positions
    ``pos : pos + width`` of a run ``j`` tokens longer than ``pos + 1``; the last entry serves
    longer runs. A batch of ``n`` rows takes each of the ``rows`` entries ``n // rows`` times in
    a row (the order :func:`~codebook_lens.fsm.metrics.append_digit_prefixes` expands prompts).
    """

    def hook_for(site: str):
        per_len = forced[site]

        def hook(codes: Tensor, hook: Any) -> Tensor:
            rows = per_len[min(codes.shape[1] - pos - 1, len(per_len) - 1)]
            rep = codes.shape[0] // rows.shape[0]
            rows = rows.repeat_interleave(rep, 0) if rep > 1 else rows
            codes[:, pos : pos + rows.shape[1]] = rows.to(codes)
            return codes

        return hook

    hooks = [(codes_hook_name(s), hook_for(s)) for s in forced]

    def run(tokens: Tensor) -> Tensor:
        return cm.run_with_hooks(tokens, fwd_hooks=hooks)

    run.cfg = cm.cfg  # type: ignore[attr-defined]
    return run


def intervention_success(
    p: Float[Tensor, "b n_states"], targets: Int[Tensor, " b"], fsm: FSM, top: int, need: int
) -> Bool[Tensor, " b"]:
    """Whether at least ``need`` of the ``top`` most likely next states in ``p`` are successors
    of the target state (the success criterion of :func:`interventions`)."""
    top_states = p.topk(top, dim=-1).indices  # [b, top]
    succ = fsm.successors.to(p.device)[targets]  # [b, n_edges]
    hits = (top_states.unsqueeze(-1) == succ.unsqueeze(1)).any(-1).sum(-1)
    return hits >= need


def _scores(
    p: Float[Tensor, "b n_states"],
    true: Float[Tensor, "b n_states"],
    targets: Int[Tensor, " b"],
    fsm: FSM,
    top: int,
    need: int,
) -> dict[str, float]:
    """Success rate and mean JSD of next-state distributions ``p`` against the targets'."""
    return {
        "success_rate": float(intervention_success(p, targets, fsm, top, need).float().mean()),
        "jsd": float(jsd(p, true).mean()),
    }


@torch.no_grad()
def interventions(
    cm: CodebookModel,
    fsm: FSM,
    cfg: ExperimentConfig,
    top: int | None = None,
    need: int | None = None,
) -> dict[str, Any]:
    """Force a target state's codes into prompts that end in other states.

    Each of the ``n_states * intervention_prompts`` prompts (walks of
    ``intervention_prompt_states`` states) gets a target state s other than its last state, and
    a *donor*: a random walk of the same length that ends in s (sampled backwards along edges).
    The donor's codes are forced, per site set, at the prompt's **state positions**: its last
    position, which predicts the next state's first digit, and the position of that first digit,
    which predicts the second (there the donor's codes after the same first digit are used).
    Both positions read the current state, and a 2-layer model also reads the raw tokens there,
    so forcing only the last position moves the first digit but leaves the second partly
    following the prompt's own state; that variant is reported as ``last_position_only`` for
    the set of all sites.

    Success: at least ``need`` (default 80% of ``n_edges``, i.e. 8) of the model's ``top``
    (default ``n_edges``) most likely next states are successors of s. Also reported: the JSD
    (nats) between the model's next-state distribution and s's true one (uniform over its
    successors), and both metrics without intervention as a baseline.
    """
    top = fsm.n_edges if top is None else top
    need = math.ceil(0.8 * fsm.n_edges) if need is None else need
    n_per = cfg.intervention_prompts
    prompts = eval_set(fsm, fsm.n_states * n_per, cfg.intervention_prompt_states, cfg.seed + 4)
    targets = torch.arange(fsm.n_states).repeat_interleave(n_per)
    last = fsm.tokens_to_states(prompts[:, 1:])[:, -1]
    targets = torch.where(targets == last, (targets + 1) % fsm.n_states, targets)
    pos = prompts.shape[1] - 1
    donor_codes = _donor_codes(cm, fsm, cfg, targets, pos)
    true = true_next_state_distribution(fsm, targets)
    clean = next_state_distribution(cm, fsm, prompts)
    out: dict[str, Any] = {
        "n_interventions": int(targets.numel()),
        "forced_positions": "state positions (last prompt position + next first digit)",
        **{f"baseline_{k}": v for k, v in _scores(clean, true, targets, fsm, top, need).items()},
        "per_site_set": {},
    }
    for name, sites in site_sets(cm).items():
        variants = {"state_positions": {s: [c[s] for c in donor_codes] for s in sites}}
        if name == "all":
            variants["last_position_only"] = {s: [donor_codes[0][s]] for s in sites}
        res: dict[str, Any] = {"sites": sites}
        for variant, forced in variants.items():
            p = next_state_distribution(_forced_model(cm, forced, pos), fsm, prompts)
            r = _scores(p, true, targets, fsm, top, need)
            res.update(r) if variant == "state_positions" else res.update({variant: r})
        out["per_site_set"][name] = res
    every = out["per_site_set"]["all"]
    out["success_rate"], out["jsd"] = every["success_rate"], every["jsd"]
    out["last_position_only_success_rate"] = every["last_position_only"]["success_rate"]
    return out


def _donor_codes(
    cm: CodebookModel, fsm: FSM, cfg: ExperimentConfig, targets: Int[Tensor, " b"], pos: int
) -> list[dict[str, Tensor]]:
    """Per digit ``j`` of the next state, the codes of donor walks ending in ``targets`` at
    positions ``pos : pos + 1 + j`` (the donor run extended by the next state's first ``j``
    digits), per site."""
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    donors = walks_to_tokens(
        fsm, sample_walks_ending_in(fsm, targets, cfg.intervention_prompt_states, gen)
    )
    device = next(cm.model.parameters()).device
    donor_runs = [
        append_digit_prefixes(donors, fsm.base, j).to(device) for j in range(fsm.n_digits)
    ]
    return [_codes_from(cm, d, cm.sites, pos) for d in donor_runs]  # [rows, 1 + j, ...]


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of a base model (codebook finetuning changes the weights it trains)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model)
