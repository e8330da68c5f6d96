"""`collect_codes`: run a model over tokens and keep the code ids of its codebooks, in memory
or written to disk as they are collected (bounded memory, resumable, across processes).

The data becomes a stream of shards: shard ``i`` holds sequences ``[i * shard_seqs,
(i + 1) * shard_seqs)``, run through the model in batches of ``batch_size``. With several
processes (Accelerate), process ``r`` runs the shards ``i`` with ``i % n_processes == r``; every
process reads the whole data stream (cheap next to the model) so that shard boundaries, batches
and order are those of one process, and the store equals a one-process collection. After each
round of shards the processes exchange their shard records (and any error, so that none waits
forever) and rank 0 commits them to the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from codebook_lens.analysis.store import CodeStore, count_codes, smallest_int_dtype
from codebook_lens.analysis.store_files import ShardFile, shard_name, write_store_shard
from codebook_lens.analysis.store_writer import StoreWriter, WritePlan
from codebook_lens.errors import CheckpointError
from codebook_lens.model import CodebookModel, codes_hook_name

__all__ = ["collect_codes"]


class _Group:
    """The processes of a collection: rank, size, and the two collectives it needs."""

    def __init__(self, accelerator: Any):
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def agree(self, fn: Callable[[], Any]) -> list[Any]:
        """Run ``fn`` here and gather every process's result; if any process raised, raise on
        all of them (the original exception where it happened)."""
        if self.world == 1:
            return [fn()]
        try:
            mine = ("ok", fn())
        except Exception as e:  # re-raised below, after the others know
            mine, err = ("error", (type(e).__name__, str(e), isinstance(e, CheckpointError))), e
        else:
            err = None
        got = self.gather(mine)
        if err is not None:
            raise err
        for r, (status, val) in enumerate(got):
            if status == "error":
                cls = CheckpointError if val[2] else RuntimeError
                raise cls(f"process {r} of the collection failed: {val[0]}: {val[1]}")
        return [val for _, val in got]


def _as_batches(data: Tensor | Iterable[Any], batch_size: int) -> Iterator[Tensor]:
    """Token batches ``[b, pos]`` (CPU) from a tensor or an iterable of tensors or dicts."""
    if isinstance(data, Tensor):
        if data.dim() != 2:
            raise ValueError(f"tokens must be [n_seq, pos], got shape {tuple(data.shape)}")
        yield from data.split(batch_size)
        return
    for b in data:
        if isinstance(b, Mapping):
            key = next((k for k in ("tokens", "input_ids") if k in b), None)
            if key is None:
                raise ValueError(
                    f"a dict batch needs a 'tokens' or 'input_ids' entry; got keys {list(b)}"
                )
            b = b[key]
        b = torch.as_tensor(b)
        yield b[None] if b.dim() == 1 else b


def _shards(
    batches: Iterator[Tensor], seq_len: int, shard_seqs: int, max_seqs: int | None
) -> Iterator[Tensor]:
    """Token tensors ``[n, pos]`` of consecutive shards (the last may be short), stopping
    after ``max_seqs`` sequences without reading further batches."""
    buf: list[Tensor] = []
    have = total = 0
    for b in batches:
        if b.dim() != 2 or b.shape[1] != seq_len:
            raise ValueError(
                f"all batches must have the same sequence length; got a batch of shape "
                f"{tuple(b.shape)} after {total + have} sequences of {seq_len} tokens (pad or "
                "truncate the dataset to one length)"
            )
        if max_seqs is not None:
            b = b[: max_seqs - total - have]
        while b.shape[0]:
            take = b[: shard_seqs - have]
            buf.append(take.cpu())
            have, b = have + take.shape[0], b[take.shape[0] :]
            if have == shard_seqs:
                yield torch.cat(buf)
                total, buf, have = total + shard_seqs, [], 0
        if max_seqs is not None and total + have >= max_seqs:
            break
    if have:
        yield torch.cat(buf)


class _Runner:
    """The model and its code hooks: runs token batches and returns compact code ids."""

    def __init__(self, cm: CodebookModel, sites: Sequence[str] | None):
        self.cm = cm
        self.sites = list(cm.sites if sites is None else sites)
        if not self.sites:
            raise ValueError("the model has no codebooks; attach one with cm.add_codebook(...)")
        self.n_codes = {s: cm.codebook(s).cfg.n_codes for s in self.sites}
        self.dtypes = {s: smallest_int_dtype(n - 1) for s, n in self.n_codes.items()}
        self.d_vocab = int(cm.cfg.d_vocab)
        self.token_dtype = smallest_int_dtype(max(self.d_vocab - 1, 0))
        self.device = next(cm.parameters()).device
        self.got: dict[str, Tensor] = {}
        self.hooks = [(codes_hook_name(s), self._grab(s)) for s in self.sites]
        self.shape: dict[str, tuple[int, int, int]] = {}
        self.per_head: dict[str, bool] = {}

    def _grab(self, site: str) -> Callable[[Tensor, Any], None]:
        def hook(codes: Tensor, hook: Any) -> None:
            self.got[site] = codes.to(self.dtypes[site]).cpu()

        return hook

    def _forward(self, batch: Tensor) -> dict[str, Tensor]:
        self.got.clear()
        self.cm.run_with_hooks(batch.to(self.device), return_type=None, fwd_hooks=self.hooks)
        for s in self.sites:
            if s not in self.got:
                raise RuntimeError(
                    f"{codes_hook_name(s)} did not fire; is the codebook at {s} disabled?"
                )
        return {s: c if c.dim() == 4 else c[:, :, None] for s, c in self.got.items()}

    def probe(self, tokens: Tensor) -> None:
        """Learn each site's ``(pos, head, k)`` layout from one sequence."""
        for s, c in self._forward(tokens[:1]).items():
            self.per_head[s] = self.got[s].dim() == 4
            self.shape[s] = tuple(c.shape[1:])

    def run(self, tokens: Tensor, batch_size: int) -> dict[str, Tensor]:
        """Codes ``[n, pos, head, k]`` (compact) of ``tokens [n, pos]``, in batches."""
        n = tokens.shape[0]
        out = {s: torch.empty((n, *sh), dtype=self.dtypes[s]) for s, sh in self.shape.items()}
        for a in range(0, n, batch_size):
            for s, c in self._forward(tokens[a : a + batch_size]).items():
                out[s][a : a + c.shape[0]] = c
        return out

    def bytes_per_seq(self, keep_tokens: bool) -> int:
        n = sum(math.prod(sh) * self.dtypes[s].itemsize for s, sh in self.shape.items())
        return n + (next(iter(self.shape.values()))[0] * self.token_dtype.itemsize * keep_tokens)

    def settings(self, seq_len: int, keep_tokens: bool, shard_seqs: int | None) -> dict[str, Any]:
        """The store layout as manifest fields."""
        return {
            "sites": self.sites,
            "n_codes": self.n_codes,
            "per_head": self.per_head,
            "dtypes": {s: str(d).removeprefix("torch.") for s, d in self.dtypes.items()},
            "shapes": {s: [0, *sh] for s, sh in self.shape.items()},
            "seq_len": seq_len,
            "has_tokens": keep_tokens,
            "token_dtype": str(self.token_dtype).removeprefix("torch.") if keep_tokens else None,
            "d_vocab": self.d_vocab,
            "shard_seqs": shard_seqs,
        }

    def fingerprint(self) -> str:
        """SHA-256 of the collected codebooks' parameters: a resume must use the same ones."""
        h = hashlib.sha256()
        for s in self.sites:
            for name, p in sorted(self.cm.codebook(s).named_parameters()):
                h.update(f"{s}.{name}{tuple(p.shape)}{p.dtype}".encode())
                h.update(p.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy())
        return h.hexdigest()


def _check_args(batch_size: int, shard_seqs: int | None, shard_mb: float, data_id: Any) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; pass a positive number of sequences")
    if shard_seqs is not None and shard_seqs < 1:
        raise ValueError(f"shard_seqs={shard_seqs}; pass a positive number of sequences")
    if not 0 < shard_mb <= 2**20:
        raise ValueError(f"shard_mb={shard_mb}; pass a size in (0, 2**20] MiB")
    try:
        json.dumps(data_id, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"data_id must be JSON (strings, numbers, lists, dicts): {e}") from e


def _limit(max_seqs: int | None, max_tokens: int | None, seq_len: int) -> int | None:
    if max_seqs is not None and max_tokens is not None:
        raise ValueError("pass max_seqs or max_tokens, not both")
    if max_tokens is not None:
        if max_tokens < seq_len:
            raise ValueError(
                f"max_tokens={max_tokens} is fewer than one sequence of {seq_len} tokens"
            )
        return max_tokens // seq_len
    if max_seqs is not None and max_seqs < 1:
        raise ValueError(f"max_seqs={max_seqs}; pass a positive number of sequences")
    return max_seqs


@torch.no_grad()
def collect_codes(
    cm: CodebookModel,
    data: Int[Tensor, "seq pos"] | Iterable[Any],
    sites: Sequence[str] | None = None,
    batch_size: int = 32,
    keep_tokens: bool = True,
    progress: bool = True,
    *,
    out: str | os.PathLike[str] | None = None,
    shard_seqs: int | None = None,
    shard_mb: float = 64.0,
    max_seqs: int | None = None,
    max_tokens: int | None = None,
    resume: bool = True,
    data_id: dict[str, Any] | None = None,
    accelerator: Any = None,
) -> CodeStore:
    """Run ``cm`` over ``data`` and keep the code ids of ``sites`` (default: all).

    Args:
        cm: A :class:`~codebook_lens.CodebookModel` (on ``accelerator.device`` with several
            processes).
        data: Tokens ``[n_seq, pos]``, or an iterable (possibly endless) of batches (tensors
            ``[b, pos]`` or dicts with ``"tokens"``/``"input_ids"``) of one sequence length.
        sites: Sites whose codes to keep.
        batch_size: Sequences per forward pass.
        keep_tokens: Also keep the tokens (needed for token features and examples, and to check
            on resume that the data is the same).
        progress: Show a tqdm progress bar (rank 0).
        out: None: return a store in memory. A directory: write the store there as it is
            collected, one shard in memory at a time, and return it opened memory-mapped.
        shard_seqs: Sequences per shard on disk (default: about ``shard_mb`` MiB of codes and
            tokens; a resume keeps the stored value).
        shard_mb: The default shard size.
        max_seqs: Stop after this many sequences (required for an endless iterable).
        max_tokens: Or after this many tokens (whole sequences: ``max_tokens // pos``).
        resume: If ``out`` holds a store collected with the same settings, continue it after
            its last complete shard (a larger ``max_seqs`` extends a finished one); a store
            collected with other settings is refused with the mismatch named. False: start a
            new store there (replacing the old one).
        data_id: JSON fields identifying the data (dataset name, split, ...), recorded and
            compared on resume (the tokens of finished shards are compared too when kept).
        accelerator: An ``accelerate.Accelerator``: each process writes its own shards of
            ``out`` (a directory every process can reach); the store equals a one-process run.

    Only code ids are kept (no activations, no logits), in the smallest integer dtype that
    holds them. In memory, a tensor dataset is preallocated (memory is :attr:`CodeStore.nbytes`
    plus one shard); on disk, memory is one shard per process whatever the data size.
    """
    _check_args(batch_size, shard_seqs, shard_mb, data_id)
    runner, group = _Runner(cm, sites), _Group(accelerator)
    if out is None and group.world > 1:
        raise ValueError("several processes write their shards to disk; pass out=DIRECTORY")
    batches = _as_batches(data, batch_size)
    first = next(batches, None)
    if first is None or first.numel() == 0:
        raise ValueError("the dataset is empty (its first batch holds no tokens)")
    if first.dim() != 2:
        raise ValueError(f"batches must be [batch, pos] tokens, got shape {tuple(first.shape)}")
    seq_len = first.shape[1]
    limit = _limit(max_seqs, max_tokens, seq_len)
    runner.probe(first)
    stream = chain([first], batches)
    known = data.shape[0] if isinstance(data, Tensor) else None
    total = min(x for x in (known, limit, 2**62) if x is not None)
    bar = tqdm(total=total if total < 2**62 else None, desc="collecting codes", unit="seq",
               disable=not progress or group.rank != 0)  # fmt: skip
    try:
        if out is None:
            sseqs = shard_seqs or max(1, int(shard_mb * 2**20) // runner.bytes_per_seq(True))
            return _in_memory(runner, _shards(stream, seq_len, sseqs, limit), known and total,
                              batch_size, keep_tokens, bar)  # fmt: skip
        settings = runner.settings(seq_len, keep_tokens, shard_seqs)
        collect = {"data": data_id or {}, "codebooks": runner.fingerprint(), "max_seqs": limit}
        default = max(1, int(shard_mb * 2**20) // runner.bytes_per_seq(keep_tokens))
        return _to_disk(runner, group, Path(out), settings, collect, (resume, default),
                        lambda plan: _shards(stream, seq_len, plan.shard_seqs, limit),
                        batch_size, bar)  # fmt: skip
    finally:
        bar.close()


def _in_memory(
    runner: _Runner, shards: Iterator[Tensor], n_total: int | None, batch_size: int,
    keep_tokens: bool, bar: Any,
) -> CodeStore:  # fmt: skip
    """Collect into memory: preallocated when the number of sequences is known."""
    parts: dict[str, list[Tensor]] = {s: [] for s in runner.sites}
    toks: list[Tensor] = []
    full = tok_full = None
    if n_total:
        full = {s: torch.empty((n_total, *sh), dtype=runner.dtypes[s])
                for s, sh in runner.shape.items()}  # fmt: skip
        seq_len = runner.shape[runner.sites[0]][0]
        if keep_tokens:
            tok_full = torch.empty((n_total, seq_len), dtype=runner.token_dtype)
    n = 0
    for t in shards:
        codes = runner.run(t, batch_size)
        for s, c in codes.items():
            if full is not None:
                full[s][n : n + c.shape[0]] = c
            else:
                parts[s].append(c)
        if keep_tokens:
            tok = t.to(runner.token_dtype)
            if tok_full is not None:
                tok_full[n : n + t.shape[0]] = tok
            else:
                toks.append(tok)
        n += t.shape[0]
        bar.update(t.shape[0])
    codes = full if full is not None else {s: torch.cat(p) for s, p in parts.items()}
    tokens = (tok_full if tok_full is not None else torch.cat(toks)) if keep_tokens else None
    return CodeStore(codes, runner.n_codes, runner.per_head, tokens, runner.d_vocab)


def _one_shard(
    runner: _Runner, plan: WritePlan, i: int, t: Tensor, batch_size: int, keep_tokens: bool
) -> dict[str, Any] | None:
    """Collect and write shard ``i`` (tokens ``t``), or check a finished one's tokens."""
    data = Path(plan.data)
    tok = t.to(runner.token_dtype) if keep_tokens else None
    if i < plan.n_done:
        if tok is not None:
            stored = ShardFile.read(data / shard_name(i), "resume with resume=False").tensor(
                "tokens"
            )
            if not torch.equal(stored, tok):
                a = i * plan.shard_seqs
                raise CheckpointError(
                    f"the data differs from the data {data.parent} was collected from: shard {i} "
                    f"(sequences {a}..{a + t.shape[0] - 1}) holds other tokens. Resume with the "
                    "same data in the same order, or pass resume=False to collect anew"
                )
        return None
    codes = runner.run(t, batch_size)
    counts = {s: count_codes(c, runner.n_codes[s]) for s, c in codes.items()}
    return write_store_shard(data, plan.store_id, i, codes, tok, counts)


def _to_disk(
    runner: _Runner, group: _Group, out: Path, settings: dict[str, Any], collect: dict[str, Any],
    how: tuple[bool, int], shards: Callable[[WritePlan], Iterator[Tensor]], batch_size: int,
    bar: Any,
) -> CodeStore:  # fmt: skip
    """Collect into the store at ``out``: rank 0 owns the manifest, every rank its shards."""
    writer = None

    def begin() -> WritePlan | None:
        nonlocal writer
        if group.rank != 0:
            return None
        writer = StoreWriter.begin(out, settings, collect, how[0], how[1])
        return writer.plan

    try:
        plan = group.agree(begin)[0]
        if not plan.finished:
            _rounds(runner, group, writer, plan, shards(plan), batch_size, settings, bar)
            group.agree(lambda: writer.finish() if writer is not None else None)
    finally:
        if writer is not None:
            writer.close()
    return CodeStore.open(out)


def _rounds(
    runner: _Runner, group: _Group, writer: StoreWriter | None, plan: WritePlan,
    shards: Iterator[Tensor], batch_size: int, settings: dict[str, Any], bar: Any,
) -> None:  # fmt: skip
    """Every rank collects its shards; after each round rank 0 commits the new ones."""
    keep, w = settings["has_tokens"], group.world
    n_shards, prepared = 0, False
    args = (batch_size, keep)
    pending: tuple[int, Tensor] | None = None  # this rank's shard of the current round
    for i, t in enumerate(shards):
        n_shards = i + 1
        if i % w == group.rank:
            pending = (i, t)
        bar.update(t.shape[0])
        if i % w == w - 1:
            prepared = _exchange(group, writer, runner, plan, pending, i, prepared, *args)
            pending = None
    if n_shards % w:
        _exchange(group, writer, runner, plan, pending, n_shards - 1, prepared, *args)
    group.agree(lambda: writer.check_end(n_shards) if writer is not None else None)


def _exchange(
    group: _Group, writer: StoreWriter | None, runner: _Runner, plan: WritePlan,
    pending: tuple[int, Tensor] | None, last: int, prepared: bool, batch_size: int, keep: bool,
) -> bool:  # fmt: skip
    """Collect this rank's shard of the round ending at shard ``last``, then let rank 0 commit
    the round. Before the first round with new shards, rank 0 prepares the store (all wait).
    Returns whether the store is prepared."""
    if not prepared and last >= plan.n_done:
        group.agree(lambda: writer.prepare() if writer is not None else None)
        prepared = True

    def work() -> dict[str, Any] | None:
        if pending is None:
            return None
        return _one_shard(runner, plan, pending[0], pending[1], batch_size, keep)

    records = [r for r in group.agree(work) if r is not None]
    if writer is not None and records:
        writer.commit(records)
    return prepared
