"""Training checkpoints for :func:`~codebook_lens.training.train_codebooks`: save and resume.

A checkpoint is a directory ``<checkpoint_dir>/checkpoint`` (see :mod:`codebook_lens.atomic`
for its versions and locks) holding

* ``state.json`` (the commit pointer): format marker, optimizer step, micro-batches consumed,
  optimizer hyperparameters, training history, the config it was written with and the record
  of every tensor (dtype, shape, SHA-256; :mod:`codebook_lens.integrity`);
* ``v-train-<hex>/state.safetensors``: the base model's ``state_dict()`` (unless the model is
  frozen) as ``model.<name>``, each codebook's ``state_dict()`` (code vectors, affine input
  norm, usage counters, recent activations) as ``cb.<site>.<name>``, the optimizer's state
  tensors (AdamW moments and step counts), metric accumulators and the RNG state.

A new checkpoint replaces the previous one in one atomic step, so an interrupted run always
finds a whole checkpoint and loses at most the steps since it. A state holding NaN or inf is
never written (:class:`NonFiniteStateError`), and a loaded one is validated before anything is
restored (tensors as recorded and finite, shapes that fit the model and optimizer, the step
within the run, the data position consistent with it, RNG states the generators accept, field
types); restoring is then all or nothing. No pickle: tensors go to safetensors, everything else
to JSON.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codebook_lens.atomic import (
    DirKind,
    check_save_target,
    holds_data,
    open_dir,
    save_dir,
)
from codebook_lens.errors import CheckpointError
from codebook_lens.integrity import check_tensors, record_tensors
from codebook_lens.model import CodebookModel
from codebook_lens.tensor_files import read_tensors, untie, write_tensors

__all__ = [
    "TrainState",
    "NonFiniteStateError",
    "save_train_state",
    "load_train_state",
    "check_checkpoint_dir",
    "first_nonfinite",
    "restore_rng",
    "checkpoint_path",
    "CKPT_FORMAT",
    "TRAIN_KIND",
]

CKPT_FORMAT = "codebook_lens.train_state"
_VERSION = 2  # state.json records every tensor
TRAIN_KIND = DirKind(
    name="training checkpoint",
    head="state.json",
    format=CKPT_FORMAT,
    tag="train",
    saver="train_codebooks (TrainConfig.checkpoint_dir)",
)
"""The on-disk kind of a training checkpoint (for :mod:`codebook_lens.atomic`)."""


class NonFiniteStateError(FloatingPointError):
    """The training state holds NaN or inf; it was not checkpointed."""

    def __init__(self, message: str, tensor: str):
        super().__init__(message)
        self.tensor = tensor
        """Name of the first non-finite tensor."""


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model and optimizer objects."""

    step: int = 0
    """Optimizer steps completed."""

    consumed: int = 0
    """Batches taken from the data iterable (micro-batches, counted once per global batch):
    ``step`` times the micro-batches per step."""

    history: list[dict[str, float]] = field(default_factory=list)
    """Logged rows so far."""

    evals: list[dict[str, float]] = field(default_factory=list)
    """``eval_fn`` results so far."""

    seconds: float = 0.0
    """Wall time spent in the loop before this checkpoint."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    """Loop-internal tensors (metric accumulators, usage counts at the last log)."""

    scalars: dict[str, Any] = field(default_factory=dict)
    """Loop-internal JSON values (e.g. how many micro-batches the accumulators hold)."""

    rng: dict[str, Tensor] = field(default_factory=dict)
    """Saved RNG states (``"cpu"``, ``"cuda.<i>"``); see :func:`restore_rng`."""


def checkpoint_path(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint directory inside ``checkpoint_dir``."""
    return Path(checkpoint_dir) / "checkpoint"


def check_checkpoint_dir(checkpoint_dir: str | os.PathLike[str]) -> None:
    """Refuse, before training starts, a ``checkpoint_dir`` that cannot hold checkpoints: a
    file or symlink, or a ``checkpoint`` entry in it that is not a training checkpoint."""
    d = Path(checkpoint_dir)
    if str(checkpoint_dir).strip() == "":
        raise ValueError("TrainConfig.checkpoint_dir is ''; pass a directory, or None")
    if d.exists() and not d.is_dir():
        raise CheckpointError(
            f"checkpoint_dir {d} is a file, not a directory; pass another checkpoint_dir"
        )
    path = checkpoint_path(d)
    if path.is_symlink() or not (path / TRAIN_KIND.head).exists():
        check_save_target(path, TRAIN_KIND, overwrite=False)
    # else: a checkpoint (or a corrupt one, which load_train_state then names precisely)


def first_nonfinite(tensors: dict[str, Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or inf, or None; one host sync."""
    named = [(k, t) for k, t in tensors.items() if t.is_floating_point() and t.numel()]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    flags = torch.ones(len(named), dtype=torch.bool)
    for idx in by_device.values():  # one reduction (and host sync) per device
        flags[idx] = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).cpu()
    if bool(flags.all()):
        return None
    return named[int((~flags).nonzero()[0, 0])][0]


def _rng_tensors() -> dict[str, Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def _state_tensors(
    cm: CodebookModel, optimizer: torch.optim.Optimizer, state: TrainState, include_model: bool
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    tensors: dict[str, Tensor] = {}
    if include_model:
        for k, v in cm.model.state_dict().items():
            tensors[f"model.{k}"] = v
    for site, cb in cm.codebooks.items():
        for name, t in cb.state_dict().items():
            tensors[f"cb.{site}.{name}"] = t
    sd = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"opt.{idx}.{key}"] = val
            else:
                opt_scalars.setdefault(str(idx), {})[key] = val
    for k, v in state.tensors.items():
        tensors[f"loop.{k}"] = v
    return tensors, opt_scalars, sd["param_groups"]


def _must_be_finite(cm: CodebookModel, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors whose finiteness a resumable state needs: parameters (not buffers such as
    attention masks, which may hold -inf), codebooks, optimizer moments, accumulators."""
    params = {f"model.{n}" for n, _ in cm.model.named_parameters()}
    return {k: t for k, t in tensors.items() if not k.startswith("model.") or k in params}


def save_train_state(
    checkpoint_dir: str | os.PathLike[str],
    cm: CodebookModel,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config: dict[str, Any],
    include_model: bool = True,
    last_good_step: int | None = None,
) -> Path:
    """Write a checkpoint of ``cm`` (a CodebookModel), ``optimizer`` and ``state`` atomically.

    ``include_model=False`` leaves out the base model's weights (when it is frozen they never
    change). Returns the checkpoint directory. A state holding NaN or inf is not written:
    :class:`NonFiniteStateError` names the first such tensor and the steps since
    ``last_good_step`` (the previous checkpoint, which stays in place).
    """
    tensors, opt_scalars, param_groups = _state_tensors(cm, optimizer, state, include_model)
    bad = first_nonfinite(_must_be_finite(cm, tensors))
    if bad is not None:
        since = f"after step {last_good_step}" if last_good_step is not None else "since the start"
        raise NonFiniteStateError(
            f"training diverged {since} and by step {state.step}: {bad} holds NaN or inf, so "
            "no checkpoint was written (the last good one, if any, is kept). Lower the learning "
            "rate, use input_norm='layernorm' for large-norm sites, or resume from the last "
            "good checkpoint",
            bad,
        )
    tensors.update(_rng_tensors())
    meta = {
        "format": CKPT_FORMAT,
        "version": _VERSION,
        "step": state.step,
        "consumed": state.consumed,
        "seconds": state.seconds,
        "history": state.history,
        "evals": state.evals,
        "scalars": state.scalars,
        "include_model": include_model,
        "sites": list(cm.codebooks),
        "optimizer": {"param_groups": param_groups, "scalars": opt_scalars},
        "config": config,
    }
    path = checkpoint_path(checkpoint_dir)
    ready = untie(tensors)  # copied to the CPU now: the model may train on while it is written
    meta["tensors"] = record_tensors(ready)

    def write(tmp: Path) -> None:
        write_tensors(ready, tmp / "state.safetensors", CKPT_FORMAT)

    save_dir(path, TRAIN_KIND, meta, write)
    return path


_STRUCTURAL = ("freeze_model", "grad_accum", "split_batches", "allow_no_codebooks")
"""Config fields a resumed run must share with the checkpoint (others, e.g. lr, may change)."""


def load_train_state(
    checkpoint_dir: str | os.PathLike[str],
    cm: CodebookModel,
    optimizer: torch.optim.Optimizer,
    set_rng: bool = True,
    steps: int | None = None,
    config: dict[str, Any] | None = None,
    micro_batches: int | None = None,
    loop_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> TrainState | None:
    """Restore ``cm`` and ``optimizer`` from the checkpoint in ``checkpoint_dir``.

    Returns the loop state, or None when there is no checkpoint yet. Everything is validated
    before anything is restored, and then everything is restored: field types, the tensors
    against their record, the step (within ``[0, steps]``), the data position ``consumed``
    (``step * micro_batches``, the micro-batches per optimizer step, when given or saved),
    ``config``'s structural fields, every tensor's shape against the model, the optimizer and
    ``loop_shapes`` (the loop tensors' expected shapes, by name), the RNG states, finiteness.
    Raises :class:`~codebook_lens.CheckpointError` on a corrupt or incomplete checkpoint (a
    missing ``state.json`` next to other files is one) or one from another setup.
    """
    path = checkpoint_path(checkpoint_dir)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_dir() and not path.is_symlink() and not (path / TRAIN_KIND.head).exists():
        names = os.listdir(path)
        if not holds_data(path) and not any(n.startswith(f"v-{TRAIN_KIND.tag}-") for n in names):
            return None  # only lock files: no checkpoint was ever committed here
        raise CheckpointError(
            f"{path} has no {TRAIN_KIND.head} but holds {sorted(names)[:5]}; the checkpoint is "
            "incomplete (its head was deleted, or the first save was killed) or foreign. Move "
            "it away to restart from step 0, or pass another checkpoint_dir"
        )
    with open_dir(path, TRAIN_KIND) as (meta, data):
        file = path / TRAIN_KIND.head
        _check_meta(meta, file, cm, steps, config)
        _check_position(meta, file, micro_batches)
        tensors = read_tensors(data / "state.safetensors", "delete the checkpoint to restart")
    plan = _Plan(meta, tensors, data / "state.safetensors", cm, optimizer)
    plan.check(dict(loop_shapes or {}))
    plan.apply()
    out = TrainState(
        step=meta["step"],
        consumed=meta["consumed"],
        history=meta["history"],
        evals=meta["evals"],
        seconds=float(meta["seconds"]),
        tensors={k[5:]: v for k, v in tensors.items() if k.startswith("loop.")},
        scalars=meta["scalars"],
        rng={k[4:]: v for k, v in tensors.items() if k.startswith("rng.")},
    )
    if set_rng:
        restore_rng(out)
    return out


def _bad(file: Path, key: str, want: str, got: Any) -> CheckpointError:
    return CheckpointError(
        f"{file}: {key!r} must be {want}, got {got!r}; the checkpoint is corrupt"
    )


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_metric_row(row: Any) -> bool:
    """A logged row: metric name -> number (bools are not numbers here)."""
    return isinstance(row, dict) and all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in row.items()
    )


def _check_meta(
    meta: dict[str, Any],
    file: Path,
    cm: CodebookModel,
    steps: int | None,
    config: dict[str, Any] | None,
) -> None:
    if meta.get("version") != _VERSION or not _is_int(meta.get("version")):
        raise _bad(file, "version", str(_VERSION), meta.get("version"))
    for key in ("step", "consumed"):
        if not _is_int(meta.get(key)) or meta[key] < 0:
            raise _bad(file, key, "an integer >= 0", meta.get(key))
    if steps is not None and meta["step"] > steps:
        raise CheckpointError(
            f"{file}: the checkpoint is at step {meta['step']}, beyond this run's steps={steps}; "
            "raise TrainConfig.steps to continue it, or use a fresh checkpoint_dir"
        )
    sec = meta.get("seconds")
    if isinstance(sec, bool) or not isinstance(sec, (int, float)) or not math.isfinite(sec):
        raise _bad(file, "seconds", "a finite number", sec)
    for key in ("history", "evals"):
        rows = meta.get(key)
        if not isinstance(rows, list) or not all(_is_metric_row(r) for r in rows):
            raise _bad(file, key, "a list of objects mapping metric names to numbers", rows)
    for key, typ, want in (
        ("scalars", dict, "an object"),
        ("include_model", bool, "true or false"),
        ("optimizer", dict, "an object"),
        ("config", dict, "an object"),
        ("sites", list, "a list of site names"),
    ):
        if not isinstance(meta.get(key), typ):
            raise _bad(file, key, want, meta.get(key))
    if not _is_int(meta["scalars"].get("n_acc", 0)) or meta["scalars"].get("n_acc", 0) < 0:
        raise _bad(file, "scalars.n_acc", "an integer >= 0", meta["scalars"].get("n_acc"))
    if not all(isinstance(s, str) for s in meta["sites"]) or sorted(meta["sites"]) != sorted(
        cm.codebooks
    ):
        raise CheckpointError(
            f"checkpoint {file.parent} has codebooks at {meta['sites']} but the model has them "
            f"at {list(cm.codebooks)}; use a fresh checkpoint_dir for a different setup"
        )
    _check_optimizer_meta(meta["optimizer"], file)
    if config is not None:
        diff = [k for k in _STRUCTURAL if k in config and meta["config"].get(k) != config[k]]
        if diff:
            k = diff[0]
            raise CheckpointError(
                f"checkpoint {file.parent} was written with {k}={meta['config'].get(k)!r}, this "
                f"run has {k}={config[k]!r}; use the same setting or a fresh checkpoint_dir"
            )


def _check_position(meta: dict[str, Any], file: Path, micro_batches: int | None) -> None:
    """The data position must be where ``step`` optimizer steps leave it: ``consumed = step *
    micro-batches per step``; the loop's accumulators and history must lie before it."""
    step, consumed = meta["step"], meta["consumed"]
    saved = meta["scalars"].get("n_micro")
    if not _is_int(saved) or saved < 1:
        raise _bad(file, "scalars.n_micro", "an integer >= 1", saved)
    if micro_batches is not None and saved != micro_batches:
        raise CheckpointError(
            f"checkpoint {file.parent} was written with {saved} micro-batches per step, this run "
            f"takes {micro_batches} (grad_accum or the accelerator's gradient accumulation); use "
            "the same setting or a fresh checkpoint_dir"
        )
    ok = consumed == step * saved
    unit = "micro-batches" if saved > 1 else "micro-batch"
    want = f"step {step} x {saved} {unit} = {step * saved}"
    if not ok:
        raise CheckpointError(
            f"{file}: the data position consumed={consumed} does not fit the checkpoint's step "
            f"{step} (expected {want}); resuming would continue on other data than the "
            "interrupted run. The checkpoint is corrupt: delete it to restart"
        )
    n_acc = meta["scalars"].get("n_acc", 0)
    if n_acc > consumed:
        raise _bad(file, "scalars.n_acc", f"at most consumed={consumed}", n_acc)
    late = [r["step"] for r in meta["history"] + meta["evals"] if r.get("step", 0) > step]
    if late:
        raise CheckpointError(
            f"{file}: the history has a row at step {late[0]}, after the checkpoint's step "
            f"{step}; the checkpoint is corrupt: delete it to restart"
        )


def _check_optimizer_meta(opt: dict[str, Any], file: Path) -> None:
    groups, scalars = opt.get("param_groups"), opt.get("scalars")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict)
        and isinstance(g.get("params"), list)
        and all(_is_int(i) for i in g["params"])
        for g in groups
    ):
        raise _bad(file, "optimizer.param_groups", "a list of {params: [int], ...}", groups)
    for g in groups:
        for key in ("lr", "weight_decay", "eps"):
            v = g.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _bad(file, f"optimizer.param_groups.{key}", "a finite number", v)
        betas = g.get("betas", [0.9, 0.999])
        if not (
            isinstance(betas, list)
            and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
        ):
            raise _bad(file, "optimizer.param_groups.betas", "two numbers", betas)
    if not isinstance(scalars, dict) or not all(
        isinstance(v, dict) and str(k).isdigit() for k, v in scalars.items()
    ):
        raise _bad(file, "optimizer.scalars", "an object of objects keyed by index", scalars)


def _real(t: Tensor) -> bool:
    return t.is_floating_point() or (not t.is_complex() and t.dtype != torch.bool)


class _Plan:
    """A loaded state checked against the model and optimizer, then applied in one go."""

    def __init__(self, meta, tensors, file, cm, optimizer):  # noqa: ANN001
        self.meta, self.tensors, self.file, self.cm, self.opt = meta, tensors, file, cm, optimizer
        self.states: dict[str, dict[str, Tensor]] = {}  # site -> checked codebook state

    def _get(self, key: str) -> Tensor:
        if key not in self.tensors:
            raise CheckpointError(
                f"{self.file} has no tensor {key!r}; the checkpoint is incomplete"
            )
        return self.tensors[key]

    def _shape(self, key: str, want: tuple[int, ...]) -> Tensor:
        t = self._get(key)
        if tuple(t.shape) != tuple(want):
            raise CheckpointError(
                f"{self.file}: {key} has shape {tuple(t.shape)}, the model's has {tuple(want)}; "
                "use a fresh checkpoint_dir for a different setup"
            )
        return t

    def check(self, loop_shapes: dict[str, tuple[int, ...]]) -> None:
        """Everything :meth:`apply` relies on, so that applying cannot fail half-way."""
        self._check_codebooks()
        self._check_optimizer_groups()
        self._check_optimizer_tensors()
        self._check_model()
        self._check_rng()
        for name, shape in loop_shapes.items():
            self._shape(f"loop.{name}", shape)
        for k, t in self.tensors.items():
            if k.startswith(("cb.", "opt.", "loop.")) and not (k.endswith(".step") or _real(t)):
                raise CheckpointError(f"{self.file}: {k} has dtype {t.dtype}; expected floats")
        nan = [
            k for k, t in self.tensors.items() if t.is_floating_point() and bool(t.isnan().any())
        ]
        bad = nan[0] if nan else first_nonfinite(_must_be_finite(self.cm, self.tensors))
        if bad is not None:
            raise CheckpointError(
                f"{self.file}: {bad} holds NaN or inf values, so training cannot resume from "
                "it; delete the checkpoint (or restore an earlier copy) and lower the learning "
                "rate"
            )
        # last: the sharper errors first
        check_tensors(self.tensors, self.meta.get("tensors"), self.file)

    def _check_codebooks(self) -> None:
        """Each codebook's state, checked against its config, for :meth:`apply`."""
        self.states = {
            site: cb.checked_state(self.tensors, cb.cfg, self.file, f"cb.{site}.", True)
            for site, cb in self.cm.codebooks.items()
        }

    def _check_model(self) -> None:
        """The saved base model's tensors are exactly this model's (none when not saved)."""
        own = self.cm.model.state_dict() if self.meta["include_model"] else {}
        for k, v in own.items():
            self._shape(f"model.{k}", tuple(v.shape))
        extra = [k for k in self.tensors if k.startswith("model.") and k[6:] not in own]
        if extra:
            raise CheckpointError(
                f"{self.file}: {extra[0]} is not a tensor of this model "
                f"({'no base model was saved' if not own else 'another architecture?'}); use a "
                "fresh checkpoint_dir for a different setup"
            )

    def _check_rng(self) -> None:
        """RNG states of the right size that the generators accept (tried, then undone)."""
        for k, t in self.tensors.items():
            if k.startswith("rng.") and (t.dtype != torch.uint8 or t.dim() != 1):
                raise CheckpointError(f"{self.file}: {k} is not an RNG state (a uint8 vector)")
        cpu = self._get("rng.cpu")
        if cpu.numel() != torch.get_rng_state().numel() or not _accepted(cpu, None):
            raise CheckpointError(
                f"{self.file}: rng.cpu is not a valid CPU RNG state ({cpu.numel()} bytes, "
                f"this torch uses {torch.get_rng_state().numel()}); the checkpoint is corrupt or "
                "from another torch version: delete it to restart"
            )
        cuda = sorted(k for k in self.tensors if k.startswith("rng.cuda."))
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            for i, k in enumerate(cuda):  # restore_rng sets exactly these
                if not _accepted(self.tensors[k], i):
                    raise CheckpointError(f"{self.file}: {k} is not a valid CUDA RNG state")

    def _check_optimizer_groups(self) -> None:
        """What ``Optimizer.load_state_dict`` requires, checked before anything is touched."""
        groups = self.meta["optimizer"]["param_groups"]
        own = self.opt.param_groups
        if len(groups) != len(own) or any(
            len(g["params"]) != len(o["params"]) for g, o in zip(groups, own)
        ):
            raise CheckpointError(
                f"{self.file}: this run's optimizer has {len(own)} parameter groups of "
                f"{[len(o['params']) for o in own]} parameters, the checkpoint's has "
                f"{len(groups)} of {[len(g['params']) for g in groups]}; use a fresh "
                "checkpoint_dir for a different setup"
            )
        ids = [i for g in groups for i in g["params"]]
        if sorted(ids) != list(range(len(ids))):
            raise _bad(self.file, "optimizer.param_groups.params", "the indices 0..n-1", ids)

    def _check_optimizer_tensors(self) -> None:
        params = [p for g in self.opt.param_groups for p in g["params"]]
        for k, t in self.tensors.items():
            if not k.startswith("opt."):
                continue
            parts = k.split(".", 2)
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(params):
                raise CheckpointError(
                    f"{self.file}: optimizer tensor {k} names no parameter of this optimizer "
                    f"({len(params)} parameters); use a fresh checkpoint_dir for a different setup"
                )
            p = params[int(parts[1])]
            if parts[2] in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and t.shape != p.shape:
                raise CheckpointError(
                    f"{self.file}: {k} has shape {tuple(t.shape)}, its parameter has "
                    f"{tuple(p.shape)}; use a fresh checkpoint_dir for a different setup"
                )

    @torch.no_grad()
    def apply(self) -> None:
        """Restore the optimizer (which checks its own layout before it changes anything),
        then the model and codebooks, whose every key and shape :meth:`check` has verified."""
        cm, tensors = self.cm, self.tensors
        opt_meta = self.meta["optimizer"]
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        for idx, extra in opt_meta["scalars"].items():
            state.setdefault(int(idx), {}).update(extra)
        try:
            self.opt.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"optimizer state in {self.file} does not fit: {e}") from e
        if self.meta["include_model"]:
            sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
            cm.model.load_state_dict(sd, strict=True)
        for site, cb in cm.codebooks.items():
            cb.load_state_dict(self.states[site], strict=False)  # "recent" may be absent


def _accepted(state: Tensor, cuda_index: int | None) -> bool:
    """Whether the CPU (or CUDA device ``cuda_index``) generator accepts ``state``; the
    generator is left as it was."""
    get = (
        torch.get_rng_state if cuda_index is None else lambda: torch.cuda.get_rng_state(cuda_index)
    )
    put = torch.set_rng_state if cuda_index is None else (
        lambda t: torch.cuda.set_rng_state(t, cuda_index)
    )  # fmt: skip
    before = get()
    try:
        put(state)
    except (RuntimeError, ValueError):
        return False
    finally:
        put(before)
    return True


def restore_rng(state: TrainState) -> None:
    """Set the global CPU (and, when the device count matches, CUDA) RNG to ``state.rng``."""
    if "cpu" in state.rng:
        torch.set_rng_state(state.rng["cpu"])
    cuda = [state.rng[k] for k in sorted(state.rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
