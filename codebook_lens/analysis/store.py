"""`CodeStore`: the code ids of chosen sites over a token dataset, kept compactly.

Memory grows with ``tokens x sites x heads x k`` small integers (the smallest signed dtype that
holds ``[-1, n_codes)``), never with activations: codes are read at ``f"{site}.hook_codes"`` with
a plain forward hook and the model's logits are not computed. A store can be saved to and loaded
from safetensors shards (``store.json`` + ``shard-*.safetensors``), written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm

from codebook_lens.atomic import DirKind, open_dir, save_dir
from codebook_lens.errors import CheckpointError
from codebook_lens.model import CodebookModel, codes_hook_name
from codebook_lens.suggest import unknown_site_error
from codebook_lens.tensor_files import read_tensors, write_tensors

__all__ = ["CodeStore", "collect_codes", "smallest_int_dtype", "STORE_FORMAT", "STORE_KIND"]

STORE_FORMAT = "codebook_lens.code_store"
_STORE_VERSION = 1
_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64}
STORE_KIND = DirKind(
    name="CodeStore",
    head="store.json",
    format=STORE_FORMAT,
    tag="store",
    flat=("shard-*.safetensors",),
    saver="CodeStore.save",
)
"""The on-disk kind of a saved CodeStore (for :mod:`codebook_lens.atomic`)."""


def smallest_int_dtype(max_value: int, min_value: int = -1) -> torch.dtype:
    """The smallest signed integer dtype holding every value in ``[min_value, max_value]``."""
    for dt in (torch.int8, torch.int16, torch.int32, torch.int64):
        info = torch.iinfo(dt)
        if info.min <= min_value and max_value <= info.max:
            return dt
    raise ValueError(f"no integer dtype holds [{min_value}, {max_value}]")


@dataclass
class CodeStore:
    """Code ids of some sites over ``n_seq`` sequences of ``seq_len`` tokens.

    Codes of every site are kept as ``[n_seq, pos, head, k]`` (``head`` = 1 at sites without a
    head/group axis); :meth:`get` returns them in the model's own layout. Build one with
    :func:`collect_codes` (from a model) or :meth:`from_codes` (from tensors).
    """

    codes: dict[str, Tensor]
    """Site -> compact code ids ``[n_seq, pos, head, k]``; -1 marks an empty slot."""

    n_codes: dict[str, int]
    """Site -> number of codes per group of its codebook (ids lie in ``[-1, n_codes)``)."""

    per_head: dict[str, bool]
    """Site -> whether the model's codes carry a head/group axis (``[b, p, head, k]``)."""

    tokens: Tensor | None = None
    """The input tokens ``[n_seq, pos]`` (compact dtype), or None if not kept."""

    d_vocab: int | None = None
    """Vocabulary size of the model (bounds token ids), if known."""

    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-ready metadata saved with the store."""

    def __post_init__(self) -> None:
        if not self.codes:
            raise ValueError("a CodeStore needs codes of at least one site")
        shapes = {s: tuple(c.shape[:2]) for s, c in self.codes.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"all sites must cover the same [n_seq, pos]; got {shapes}")
        for s, c in self.codes.items():
            if c.dim() != 4:
                raise ValueError(
                    f"codes of {s} must be [n_seq, pos, head, k], got {tuple(c.shape)}"
                )
            if s not in self.n_codes or s not in self.per_head:
                raise ValueError(f"n_codes and per_head must name every site; missing {s!r}")
        if self.tokens is not None and tuple(self.tokens.shape) != next(iter(shapes.values())):
            raise ValueError(
                f"tokens {tuple(self.tokens.shape)} must match the codes' [n_seq, pos] "
                f"{next(iter(shapes.values()))}"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(
        cls,
        codes: Mapping[str, Int[Tensor, "seq pos *head k"]],
        n_codes: Mapping[str, int] | int,
        tokens: Int[Tensor, "seq pos"] | None = None,
        d_vocab: int | None = None,
    ) -> CodeStore:
        """Build a store from code tensors in the model's layout (``[b, p, k]`` or
        ``[b, p, head, k]``), e.g. ``cache[codes_hook_name(site)]``. ``n_codes`` may be one int
        for all sites."""
        nc = {s: (n_codes if isinstance(n_codes, int) else n_codes[s]) for s in codes}
        store_codes, per_head = {}, {}
        for s, c in codes.items():
            if c.dim() not in (3, 4):
                raise ValueError(
                    f"codes of {s} must be [batch, pos, k] or [batch, pos, head, k], got "
                    f"{tuple(c.shape)}"
                )
            if c.numel() and (int(c.min()) < -1 or int(c.max()) >= nc[s]):
                raise ValueError(
                    f"codes of {s} must lie in [-1, {nc[s]}); got [{int(c.min())}, "
                    f"{int(c.max())}]; pass the right n_codes"
                )
            per_head[s] = c.dim() == 4
            c4 = c if per_head[s] else c[:, :, None]
            store_codes[s] = c4.to("cpu", smallest_int_dtype(nc[s] - 1))
        if tokens is not None:
            hi = int(tokens.max()) if tokens.numel() else 0
            d_vocab = d_vocab if d_vocab is not None else hi + 1
            tokens = tokens.to("cpu", smallest_int_dtype(max(d_vocab - 1, 0)))
        return cls(store_codes, nc, per_head, tokens, d_vocab)

    # ------------------------------------------------------------------ shape facts
    @property
    def sites(self) -> list[str]:
        """Stored sites, in order."""
        return list(self.codes)

    @property
    def n_seq(self) -> int:
        """Number of sequences."""
        return next(iter(self.codes.values())).shape[0]

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return next(iter(self.codes.values())).shape[1]

    @property
    def n_tokens(self) -> int:
        """``n_seq * seq_len``."""
        return self.n_seq * self.seq_len

    @property
    def nbytes(self) -> int:
        """Bytes held by code ids and tokens."""
        n = sum(c.numel() * c.element_size() for c in self.codes.values())
        if self.tokens is not None:
            n += self.tokens.numel() * self.tokens.element_size()
        return n

    def check_site(self, site: str) -> None:
        """Raise a KeyError naming the stored sites if ``site`` is not one of them."""
        if site not in self.codes:
            raise unknown_site_error(site, self.codes, "stored codes")

    def n_heads(self, site: str) -> int:
        """Size of the head/group axis of ``site`` (1 for sites without one)."""
        self.check_site(site)
        return self.codes[site].shape[2]

    def k(self, site: str) -> int:
        """Code slots per position (and head) at ``site``."""
        self.check_site(site)
        return self.codes[site].shape[3]

    def get(self, site: str, dtype: torch.dtype = torch.long) -> Int[Tensor, "seq pos *head k"]:
        """Codes of ``site`` in the model's layout (``[b, p, k]`` or ``[b, p, head, k]``)."""
        self.check_site(site)
        c = self.codes[site].to(dtype)
        return c if self.per_head[site] else c[:, :, 0]

    def require_tokens(self) -> Tensor:
        """The stored tokens as int64, or a clear error if the store kept none."""
        if self.tokens is None:
            raise ValueError(
                "this CodeStore has no tokens; collect it with keep_tokens=True or pass "
                "tokens= to CodeStore.from_codes"
            )
        return self.tokens.long()

    # ------------------------------------------------------------------ queries
    def code_counts(self, site: str) -> Int[Tensor, "head n_codes"]:
        """How many positions each code fires at, per head (a code counts once per position)."""
        self.check_site(site)
        c = self.codes[site]
        h, n = c.shape[2], self.n_codes[site]
        counts = torch.zeros(h * n, dtype=torch.long)
        offs = (torch.arange(h) * n).view(1, h, 1)
        for chunk in c.reshape(-1, h, c.shape[3]).split(1 << 18):
            chunk = dedupe_slots(chunk.long())
            ids = (chunk + offs)[chunk >= 0]
            counts += torch.bincount(ids, minlength=h * n)
        return counts.view(h, n)

    def fires(self, site: str, code: int, head: int | None = None) -> Bool[Tensor, "seq pos"]:
        """Where ``code`` fires at ``site`` (in any slot; at ``head``, or at any head if None)."""
        self.check_code(site, code)
        c = self.codes[site]
        if head is not None:
            h = c.shape[2]
            if not -h <= head < h:
                raise IndexError(f"head {head} out of range; {site} has {h} head(s)")
            c = c[:, :, head : head + 1 if head != -1 else None]
        return (c == code).any(-1).any(-1)

    def positions(self, site: str, code: int, head: int | None = None) -> Int[Tensor, "n 2"]:
        """``(seq, pos)`` rows of every position where ``code`` fires (see :meth:`fires`)."""
        return self.fires(site, code, head).nonzero()

    def check_code(self, site: str, code: int) -> None:
        """An IndexError naming the valid range when ``code`` is not a code id of ``site``."""
        self.check_site(site)
        n = self.n_codes[site]
        if not 0 <= int(code) < n:
            raise IndexError(f"code {code} out of range; {site} has codes 0..{n - 1}")

    # ------------------------------------------------------------------ io
    def save(
        self, path: str | os.PathLike[str], shard_mb: float = 256.0, overwrite: bool = False
    ) -> None:
        """Write ``store.json`` and ``shard-NNNNN.safetensors`` files (whole sequences per shard,
        at most about ``shard_mb`` MiB each) to directory ``path`` in one atomic step.

        A directory holding anything other than a CodeStore is refused unless ``overwrite=True``
        (which still replaces only codebook_lens's own files)."""
        per_seq = max(1, self.nbytes // max(self.n_seq, 1))
        seqs_per_shard = max(1, int(shard_mb * 2**20) // per_seq)
        n_shards = max(1, math.ceil(self.n_seq / seqs_per_shard))
        header = {
            "format": STORE_FORMAT,
            "version": _STORE_VERSION,
            "sites": self.sites,
            "n_codes": self.n_codes,
            "per_head": self.per_head,
            "shapes": {s: list(c.shape) for s, c in self.codes.items()},
            "dtypes": {s: str(c.dtype).removeprefix("torch.") for s, c in self.codes.items()},
            "has_tokens": self.tokens is not None,
            "d_vocab": self.d_vocab,
            "n_shards": n_shards,
            "meta": self.meta,
        }

        def write(tmp: Path) -> None:
            for i in range(n_shards):
                sl = slice(i * seqs_per_shard, (i + 1) * seqs_per_shard)
                tensors = {f"codes.{s}": c[sl] for s, c in self.codes.items()}
                if self.tokens is not None:
                    tensors["tokens"] = self.tokens[sl]
                write_tensors(tensors, tmp / f"shard-{i:05d}.safetensors", STORE_FORMAT)

        save_dir(path, STORE_KIND, header, write, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CodeStore:
        """Load a store written by :meth:`save`. Raises CheckpointError, naming the file and
        field, on a missing, corrupt or inconsistent directory (header fields of the wrong
        type, shards that disagree with the header, ids outside ``[-1, n_codes)``)."""
        path = Path(path)
        with open_dir(path, STORE_KIND) as (header, data):
            file = path / STORE_KIND.head
            _check_header(header, file)
            codes, tokens = _read_shards(header, data)
        for s, c in codes.items():
            _check_codes(s, c, header, file)
        if tokens is not None:
            _check_tokens(tokens, header, file)
        try:
            return cls(
                codes=codes,
                n_codes=dict(header["n_codes"]),
                per_head=dict(header["per_head"]),
                tokens=tokens,
                d_vocab=header.get("d_vocab"),
                meta=header.get("meta", {}),
            )
        except ValueError as e:
            raise CheckpointError(f"{path} is not a consistent CodeStore: {e}") from e


def _is_int(v: Any) -> bool:
    return type(v) is int


def _site_map(header: dict[str, Any], key: str, ok: Any, want: str, file: Path) -> None:
    m = header.get(key)
    if not isinstance(m, dict) or set(m) != set(header["sites"]):
        raise CheckpointError(f"{file}: {key!r} must map every site to {want}, got {m!r}")
    bad = [s for s, v in m.items() if not ok(v)]
    if bad:
        raise CheckpointError(f"{file}: {key}[{bad[0]!r}] = {m[bad[0]]!r} is not {want}")


def _check_header(header: dict[str, Any], file: Path) -> None:
    """Raise CheckpointError naming the field if ``store.json`` content is malformed."""
    v = header.get("version")
    if not _is_int(v) or not 1 <= v <= _STORE_VERSION:
        raise CheckpointError(
            f"{file}: version {v!r} is not a CodeStore format version this codebook_lens reads "
            f"(1..{_STORE_VERSION}); upgrade codebook_lens or re-save the store"
        )
    sites = header.get("sites")
    if (
        not isinstance(sites, list)
        or not sites
        or not all(isinstance(s, str) for s in sites)
        or len(set(sites)) != len(sites)
    ):
        raise CheckpointError(f"{file}: 'sites' must be a non-empty list of names, got {sites!r}")
    _site_map(header, "n_codes", lambda n: _is_int(n) and n >= 1, "an integer >= 1", file)
    _site_map(header, "per_head", lambda b: isinstance(b, bool), "true or false", file)
    _site_map(
        header,
        "shapes",
        lambda sh: isinstance(sh, list) and len(sh) == 4 and all(_is_int(x) and x >= 0 for x in sh),
        "[n_seq, pos, head, k] of integers",
        file,
    )
    _site_map(
        header,
        "dtypes",
        lambda d: isinstance(d, str) and d in _DTYPES,
        f"one of {sorted(_DTYPES)}",
        file,
    )
    for key, ok, want in (
        ("has_tokens", lambda b: isinstance(b, bool), "true or false"),
        ("d_vocab", lambda d: d is None or (_is_int(d) and d >= 1), "null or an integer >= 1"),
        ("n_shards", lambda n: _is_int(n) and 1 <= n <= 10**6, "an integer in [1, 10**6]"),
        ("meta", lambda m: isinstance(m, dict), "an object"),
    ):
        if key == "meta" and key not in header:
            continue
        if not ok(header.get(key)):
            raise CheckpointError(f"{file}: {key!r} must be {want}, got {header.get(key)!r}")
    for s in sites:
        if not header["per_head"][s] and header["shapes"][s][2] != 1:
            raise CheckpointError(
                f"{file}: {s} has per_head=false but {header['shapes'][s][2]} heads in 'shapes'; "
                "the header contradicts itself"
            )


def _read_shards(header: dict[str, Any], data: Path) -> tuple[dict[str, Tensor], Tensor | None]:
    parts: dict[str, list[Tensor]] = {s: [] for s in header["sites"]}
    toks: list[Tensor] = []
    for i in range(header["n_shards"]):
        f = data / f"shard-{i:05d}.safetensors"
        shard = read_tensors(f)
        for s in parts:
            key = f"codes.{s}"
            if key not in shard:
                raise CheckpointError(f"shard {f} lacks {key!r}")
            c = shard[key]
            if c.dim() != 4 or list(c.shape[1:]) != header["shapes"][s][1:]:
                raise CheckpointError(
                    f"shard {f}: {key} has shape {list(c.shape)}; store.json says "
                    f"[*, {', '.join(map(str, header['shapes'][s][1:]))}]"
                )
            parts[s].append(c)
        if header["has_tokens"]:
            if "tokens" not in shard:
                raise CheckpointError(f"shard {f} lacks 'tokens' (store.json says has_tokens)")
            toks.append(shard["tokens"])
    tokens = None
    if toks:
        if any(t.dim() != 2 or t.shape[1:] != toks[0].shape[1:] for t in toks):
            raise CheckpointError(f"the shards in {data} hold tokens of different shapes")
        tokens = torch.cat(toks)
    return {s: torch.cat(p) for s, p in parts.items()}, tokens


def _check_codes(site: str, c: Tensor, header: dict[str, Any], file: Path) -> None:
    want, dtype = header["shapes"][site], header["dtypes"][site]
    if list(c.shape) != want or str(c.dtype).removeprefix("torch.") != dtype:
        raise CheckpointError(
            f"codes of {site} have shape {list(c.shape)}, dtype {c.dtype}; {file} says "
            f"{want}, {dtype}"
        )
    n = header["n_codes"][site]
    if c.numel() and (int(c.min()) < -1 or int(c.max()) >= n):
        raise CheckpointError(
            f"codes of {site} lie in [{int(c.min())}, {int(c.max())}], outside [-1, {n}) "
            f"({file} says n_codes={n}); the store is corrupt"
        )


def _check_tokens(tokens: Tensor, header: dict[str, Any], file: Path) -> None:
    if tokens.is_floating_point() or tokens.dtype == torch.bool or tokens.is_complex():
        raise CheckpointError(f"tokens next to {file} have dtype {tokens.dtype}; expected integers")
    hi = header.get("d_vocab")
    if tokens.numel() and (int(tokens.min()) < 0 or (hi is not None and int(tokens.max()) >= hi)):
        raise CheckpointError(
            f"tokens next to {file} lie in [{int(tokens.min())}, {int(tokens.max())}], outside "
            f"[0, d_vocab={hi})"
        )


def dedupe_slots(codes: Int[Tensor, "... k"]) -> Int[Tensor, "... k"]:
    """Codes with repeated ids within a position replaced by -1 (the lowest slot keeps its id),
    so that each code counts once per position. Slot order is kept."""
    if codes.shape[-1] < 2:
        return codes
    s, i = codes.sort(dim=-1, stable=True)
    dup_sorted = torch.zeros_like(s, dtype=torch.bool)
    dup_sorted[..., 1:] = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
    dup = torch.zeros_like(dup_sorted).scatter_(-1, i, dup_sorted)
    return codes.masked_fill(dup, -1)


def _as_batches(
    data: Tensor | Iterable[Any], batch_size: int
) -> tuple[Iterable[Tensor], int | None]:
    """Batches of tokens and the number of batches (None if unknown)."""
    if isinstance(data, Tensor):
        if data.dim() != 2:
            raise ValueError(f"tokens must be [n_seq, pos], got shape {tuple(data.shape)}")
        return data.split(batch_size), math.ceil(data.shape[0] / batch_size)
    total = None
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        pass

    def gen() -> Iterable[Tensor]:
        for b in data:
            if isinstance(b, Mapping):
                for key in ("tokens", "input_ids"):
                    if key in b:
                        b = b[key]
                        break
                else:
                    raise ValueError(
                        f"a dict batch needs a 'tokens' or 'input_ids' entry; got keys {list(b)}"
                    )
            b = torch.as_tensor(b)
            if b.dim() == 1:
                b = b[None]
            yield b

    return gen(), total


@torch.no_grad()
def collect_codes(
    cm: CodebookModel,
    data: Int[Tensor, "seq pos"] | Iterable[Any],
    sites: Sequence[str] | None = None,
    batch_size: int = 32,
    keep_tokens: bool = True,
    progress: bool = True,
) -> CodeStore:
    """Run ``cm`` over ``data`` and keep the code ids of ``sites`` (default: all).

    Args:
        cm: A :class:`~codebook_lens.CodebookModel`.
        data: Tokens ``[n_seq, pos]`` (split into batches of ``batch_size``), or an iterable of
            batches (tensors ``[b, pos]`` or dicts with ``"tokens"``/``"input_ids"``); all
            batches must share one sequence length.
        sites: Sites whose codes to keep.
        batch_size: Sequences per forward pass when ``data`` is a tensor.
        keep_tokens: Also keep the tokens (needed for token features and examples).
        progress: Show a tqdm progress bar.

    Only code ids are kept (no activations, no logits), as the smallest integer dtype that holds
    them; with a tensor input the store is preallocated, so memory is exactly
    :attr:`CodeStore.nbytes` plus one batch's forward pass.
    """
    sites = list(cm.sites if sites is None else sites)
    if not sites:
        raise ValueError("the model has no codebooks; attach one with cm.add_codebook(...)")
    n_codes = {s: cm.codebook(s).cfg.n_codes for s in sites}
    dtypes = {s: smallest_int_dtype(n - 1) for s, n in n_codes.items()}
    d_vocab = int(cm.cfg.d_vocab)
    batches, n_batches = _as_batches(data, batch_size)
    n_total = data.shape[0] if isinstance(data, Tensor) else None
    rows = {s: _Rows(n_total, dtypes[s]) for s in sites}
    toks = _Rows(n_total, smallest_int_dtype(max(d_vocab - 1, 0)))
    per_head: dict[str, bool] = {}
    got: dict[str, Tensor] = {}

    def grab(site: str):
        def hook(codes: Tensor, hook: Any) -> None:
            got[site] = codes.to(dtypes[site]).cpu()

        return hook

    fwd_hooks = [(codes_hook_name(s), grab(s)) for s in sites]
    seq_len = None
    bar = tqdm(total=n_batches, desc="collecting codes", unit="batch", disable=not progress)
    device = next(cm.parameters()).device
    for batch in batches:
        batch = batch.to(device)
        if seq_len is None:
            seq_len = batch.shape[1]
        elif batch.shape[1] != seq_len:
            raise ValueError(
                f"all batches must have the same sequence length; got {batch.shape[1]} after "
                f"{seq_len} (pad or truncate the dataset to one length)"
            )
        got.clear()
        cm.run_with_hooks(batch, return_type=None, fwd_hooks=fwd_hooks)
        for s in sites:
            if s not in got:
                raise RuntimeError(
                    f"{codes_hook_name(s)} did not fire; is the codebook at {s} disabled?"
                )
            per_head[s] = got[s].dim() == 4
            rows[s].add(got[s] if per_head[s] else got[s][:, :, None])
        if keep_tokens:
            toks.add(batch.cpu())
        bar.update(1)
    bar.close()
    if seq_len is None:
        raise ValueError("the dataset is empty")
    codes = {s: r.result() for s, r in rows.items()}
    tokens = toks.result() if keep_tokens else None
    return CodeStore(codes, n_codes, per_head, tokens, d_vocab)


class _Rows:
    """Batches ``[b, ...]`` stacked along the first axis: copied into one preallocated
    ``[n_total, ...]`` tensor when ``n_total`` is known (no second copy at the end), else
    concatenated at the end."""

    def __init__(self, n_total: int | None, dtype: torch.dtype):
        self.n_total, self.dtype = n_total, dtype
        self.parts: list[Tensor] = []
        self.full: Tensor | None = None
        self.n = 0

    def add(self, t: Tensor) -> None:
        t = t.to(self.dtype)
        if self.n_total is None:
            self.parts.append(t)
        else:
            if self.full is None:
                self.full = torch.empty((self.n_total, *t.shape[1:]), dtype=self.dtype)
            self.full[self.n : self.n + t.shape[0]] = t
        self.n += t.shape[0]

    def result(self) -> Tensor:
        return self.full if self.full is not None else torch.cat(self.parts)
