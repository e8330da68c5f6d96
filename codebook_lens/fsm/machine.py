"""The TokFSM finite-state machine (Tamkin et al., *Codebook Features*, arXiv 2310.17230).

A TokFSM has ``n_states`` hidden states. Each state has ``n_edges`` *distinct* successors drawn
uniformly at random (self-loops allowed), and every transition has probability ``1 / n_edges``.
A state is written as ``n_digits`` digit tokens, its zero-padded base-``base`` representation,
most significant digit first; the token ``base`` is the BOS token, so the vocabulary has
``base + 1`` tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codebook_lens.atomic import write_file
from codebook_lens.digit_units import DigitPrompts

__all__ = ["FSM", "n_digits_for"]

_JSON_KEYS = ("n_states", "n_edges", "base", "seed", "successors")


def n_digits_for(n_states: int, base: int) -> int:
    """Number of base-``base`` digits needed to write every state id in ``[0, n_states)``."""
    if n_states < 1:
        raise ValueError(f"n_states must be >= 1, got {n_states}")
    if base < 2:
        raise ValueError(f"base must be >= 2, got {base}")
    n = 1
    while base**n < n_states:
        n += 1
    return n


def _random_successors(n_states: int, n_edges: int, seed: int) -> Int[Tensor, "state edge"]:
    """Draw ``n_edges`` distinct successors per state, uniformly, deterministically from ``seed``.

    One random matrix, one ``argsort``: row ``s`` of the result is the first ``n_edges`` entries
    of a uniformly random permutation of the states.
    """
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(n_states, n_states, generator=gen)
    return keys.argsort(dim=1)[:, :n_edges].contiguous()


class FSM:
    """A random TokFSM: ``n_states`` states, ``n_edges`` distinct uniform successors each.

    Args:
        n_states: Number of hidden states.
        n_edges: Number of distinct successors of every state (each taken with probability
            ``1 / n_edges``). Must be in ``[1, n_states]``.
        base: Number of digit tokens; a state is written in base ``base``.
        seed: Seed of the generator that draws the successors. The same arguments always give
            the same machine.
        successors: Optional explicit successor table ``[n_states, n_edges]`` (used by
            :meth:`from_dict`); when given, ``seed`` is only recorded, not used.

    Attributes:
        successors: ``LongTensor [n_states, n_edges]``; row ``s`` lists the successors of ``s``.
        n_digits: Digit tokens per state (2 for 100 states in base 10).
        bos: The BOS token id (``base``).
        d_vocab: Vocabulary size (``base + 1``).
    """

    def __init__(
        self,
        n_states: int = 100,
        n_edges: int = 10,
        base: int = 10,
        seed: int = 0,
        successors: Int[Tensor, "state edge"] | None = None,
    ) -> None:
        for name, value in (("n_states", n_states), ("n_edges", n_edges), ("base", base)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 1 <= n_edges <= n_states:
            raise ValueError(
                f"n_edges must be in [1, n_states={n_states}] (successors are distinct), "
                f"got {n_edges}"
            )
        self.n_states = n_states
        self.n_edges = n_edges
        self.base = base
        self.seed = seed
        self.n_digits = n_digits_for(n_states, base)
        if successors is None:
            successors = _random_successors(n_states, n_edges, seed)
        else:
            successors = torch.as_tensor(successors, dtype=torch.long).clone()
            _check_successors(successors, n_states, n_edges)
        self.successors: Int[Tensor, "state edge"] = successors

    # ------------------------------------------------------------------ vocabulary
    @property
    def bos(self) -> int:
        """The BOS token id (equal to ``base``; digits are ``0 .. base-1``)."""
        return self.base

    @property
    def d_vocab(self) -> int:
        """Vocabulary size: ``base`` digit tokens plus BOS."""
        return self.base + 1

    # ------------------------------------------------------------------ graph
    def transition_matrix(self) -> Float[Tensor, "state next_state"]:
        """Dense transition matrix ``T[a, b] = P(next = b | current = a)``; rows sum to 1."""
        t = torch.zeros(self.n_states, self.n_states)
        t.scatter_(1, self.successors, 1.0 / self.n_edges)
        return t

    def adjacency(self) -> Bool[Tensor, "state next_state"]:
        """Boolean adjacency matrix: ``A[a, b]`` is True iff ``b`` is a successor of ``a``."""
        a = torch.zeros(self.n_states, self.n_states, dtype=torch.bool)
        a.scatter_(1, self.successors, True)
        return a

    def is_edge(
        self, a: Int[Tensor, "*a_shape"] | int, b: Int[Tensor, "*b_shape"] | int
    ) -> Bool[Tensor, "*shape"]:
        """Elementwise: is ``a -> b`` an edge? Out-of-range states are never edges.

        ``a`` and ``b`` broadcast against each other (tensors or ints).
        """
        a = torch.as_tensor(a, dtype=torch.long)
        b = torch.as_tensor(b, dtype=torch.long)
        a, b = torch.broadcast_tensors(a, b)
        valid = (a >= 0) & (a < self.n_states) & (b >= 0) & (b < self.n_states)
        succ = self.successors.to(a.device)[a.clamp(0, self.n_states - 1)]  # [..., n_edges]
        out = (succ == b.clamp(0, self.n_states - 1).unsqueeze(-1)).any(-1)
        return out & valid

    # ------------------------------------------------------------------ tokens <-> states
    def _place_values(self, device: torch.device | None = None) -> Int[Tensor, " digit"]:
        """``[base**(n_digits-1), ..., base, 1]``: the value of each digit position."""
        exps = torch.arange(self.n_digits - 1, -1, -1, device=device)
        return torch.full_like(exps, self.base) ** exps

    def states_to_tokens(self, states: Int[Tensor, "*batch step"]) -> Int[Tensor, "*batch pos"]:
        """Write states as digit tokens: ``[..., L] -> [..., L * n_digits]`` (no BOS).

        Raises:
            ValueError: if a state is outside ``[0, n_states)``.
        """
        states = torch.as_tensor(states, dtype=torch.long)
        if states.numel() and (states.min() < 0 or states.max() >= self.n_states):
            raise ValueError(
                f"states must be in [0, {self.n_states}); got range "
                f"[{int(states.min())}, {int(states.max())}]"
            )
        place = self._place_values(states.device)
        digits = (states.unsqueeze(-1) // place) % self.base  # [..., L, n_digits]
        return digits.flatten(-2)

    def tokens_to_states(self, tokens: Int[Tensor, "*batch pos"]) -> Int[Tensor, "*batch step"]:
        """Read digit tokens back as states: ``[..., L * n_digits] -> [..., L]`` (no BOS).

        Raises:
            ValueError: if the length is not a multiple of ``n_digits`` or a token is not a digit.
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.shape[-1] % self.n_digits != 0:
            raise ValueError(
                f"token length {tokens.shape[-1]} is not a multiple of n_digits={self.n_digits}; "
                "strip the BOS token first"
            )
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.base):
            raise ValueError(
                f"tokens must be digits in [0, {self.base}) (BOS={self.bos} must be stripped)"
            )
        digits = tokens.unflatten(-1, (-1, self.n_digits))
        return (digits * self._place_values(tokens.device)).sum(-1)

    def digit_prompts(self) -> DigitPrompts:
        """The machine's prompt format (digits, states, BOS, edges), as the browser reads it
        from a run directory."""
        return DigitPrompts(
            self.base, self.n_digits, self.n_states, self.bos, self.successors.tolist()
        )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict with keys ``n_states, n_edges, base, seed, successors``."""
        return {
            "n_states": self.n_states,
            "n_edges": self.n_edges,
            "base": self.base,
            "seed": self.seed,
            "successors": self.successors.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Any) -> FSM:
        """Rebuild an FSM from :meth:`to_dict` output, validating every field.

        Raises:
            ValueError: on missing/unknown keys, wrong types, a successor table of the wrong
                shape, out-of-range successors, or repeated successors of a state.
        """
        if not isinstance(d, dict):
            raise ValueError(f"FSM description must be a JSON object, got {type(d).__name__}")
        keys = set(d)
        missing = [k for k in _JSON_KEYS if k not in keys]
        unknown = sorted(keys - set(_JSON_KEYS))
        if missing or unknown:
            raise ValueError(
                f"FSM description must have exactly the keys {list(_JSON_KEYS)}; "
                f"missing {missing}, unknown {unknown}"
            )
        for k in ("n_states", "n_edges", "base", "seed"):
            if not isinstance(d[k], int) or isinstance(d[k], bool):
                raise ValueError(f"FSM field {k!r} must be an int, got {d[k]!r}")
        succ = d["successors"]
        if not isinstance(succ, list) or not all(isinstance(row, list) for row in succ):
            raise ValueError("FSM field 'successors' must be a list of lists of ints")
        if not all(isinstance(x, int) and not isinstance(x, bool) for row in succ for x in row):
            raise ValueError("FSM field 'successors' must contain only ints")
        n_states, n_edges = d["n_states"], d["n_edges"]
        if len(succ) != n_states or any(len(row) != n_edges for row in succ):
            raise ValueError(
                f"FSM field 'successors' must be {n_states} rows of {n_edges} ints "
                f"(n_states x n_edges)"
            )
        return cls(
            n_states=n_states,
            n_edges=n_edges,
            base=d["base"],
            seed=d["seed"],
            successors=torch.tensor(succ, dtype=torch.long).reshape(n_states, n_edges),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the FSM as JSON, atomically (:func:`codebook_lens.atomic.write_file`)."""
        write_file(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FSM:
        """Read an FSM written by :meth:`save`.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if the file is not valid JSON or its content is invalid (the message
                names the file and the problem).
        """
        path = Path(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a valid FSM JSON file: {e}") from e
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: invalid FSM: {e}") from e

    @classmethod
    def from_transition_matrix(
        cls, matrix: Float[Tensor, "state next_state"] | Any, base: int = 10, seed: int = 0
    ) -> FSM:
        """An FSM from a dense transition matrix ``T[a, b] = P(next = b | a)``, such as the
        reference implementation's ``fsm.npy``: every row must have the same number of
        non-zero entries, all equal (uniform successors), summing to 1. ``seed`` is only
        recorded (the matrix fixes the machine).

        Raises:
            ValueError: naming the first row that is not uniform over a fixed number of states.
        """
        t = torch.as_tensor(matrix, dtype=torch.float64)
        if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] == 0:
            raise ValueError(f"a transition matrix is square [N, N], got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all() or (t < 0).any():
            raise ValueError("transition probabilities must be finite and >= 0")
        nonzero = t > 0
        counts = nonzero.sum(1)
        n_edges = int(counts[0])
        expect = torch.where(
            nonzero, torch.full_like(t, 1.0 / max(n_edges, 1)), torch.zeros_like(t)
        )
        bad = (counts != n_edges) | ((t - expect).abs() > 1e-6).any(1)
        if n_edges == 0 or bad.any():
            row = int(bad.nonzero()[0]) if bad.any() else 0
            raise ValueError(
                f"row {row} of the transition matrix is not uniform over {n_edges} successors "
                f"(it has {int(counts[row])} non-zero entries); a TokFSM has the same number of "
                "equally likely successors for every state"
            )
        successors = nonzero.to(torch.int8).argsort(dim=1, descending=True, stable=True)
        return cls(t.shape[0], n_edges, base, seed, successors=successors[:, :n_edges])

    @classmethod
    def load_npy(cls, path: str | os.PathLike[str], base: int = 10) -> FSM:
        """Read the reference implementation's ``fsm.npy`` (its ``FSM.save``: the N x N
        transition matrix), with ``np.load(allow_pickle=False)``; see
        :meth:`from_transition_matrix`.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if the file is not a numeric ``.npy`` array or not a TokFSM matrix.
        """
        import numpy as np

        try:
            matrix = np.load(path, allow_pickle=False)
        except ValueError as e:  # object arrays need pickle; refused
            raise ValueError(f"{path} is not a numeric .npy array ({e})") from e
        if not isinstance(matrix, np.ndarray) or matrix.dtype.kind not in "fiub":
            raise ValueError(f"{path} does not hold a numeric array")
        try:
            return cls.from_transition_matrix(matrix, base=base)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    # ------------------------------------------------------------------ dunder
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FSM):
            return NotImplemented
        return (
            self.n_states == other.n_states
            and self.n_edges == other.n_edges
            and self.base == other.base
            and self.seed == other.seed
            and torch.equal(self.successors, other.successors)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable tensor inside

    def __repr__(self) -> str:
        return (
            f"FSM(n_states={self.n_states}, n_edges={self.n_edges}, base={self.base}, "
            f"seed={self.seed})"
        )


def _check_successors(succ: Tensor, n_states: int, n_edges: int) -> None:
    """Validate an explicit successor table (shape, range, distinct rows)."""
    if succ.shape != (n_states, n_edges):
        raise ValueError(
            f"successors must have shape (n_states, n_edges) = ({n_states}, {n_edges}), "
            f"got {tuple(succ.shape)}"
        )
    if succ.numel() and (succ.min() < 0 or succ.max() >= n_states):
        bad = ((succ < 0) | (succ >= n_states)).nonzero()[0].tolist()
        raise ValueError(
            f"successors must be state ids in [0, {n_states}); "
            f"state {bad[0]} has successor {int(succ[bad[0], bad[1]])}"
        )
    s = succ.sort(dim=1).values
    dup = (s[:, 1:] == s[:, :-1]).any(dim=1)
    if dup.any():
        state = int(dup.nonzero()[0, 0])
        raise ValueError(
            f"successors of each state must be distinct; state {state} has repeated successors "
            f"{succ[state].tolist()}"
        )
