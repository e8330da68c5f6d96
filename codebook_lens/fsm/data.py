"""TokFSM datasets: seeded random walks, their token sequences, and per-position state labels.

A walk of ``n_steps`` states is written as ``[BOS, d(s_0), d(s_1), ...]`` where ``d(s)`` is the
``n_digits`` digit tokens of state ``s``, so a sequence has ``1 + n_steps * n_digits`` tokens.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from codebook_lens.fsm.machine import FSM

__all__ = [
    "TokFSMStream",
    "eval_set",
    "sample_walks",
    "sample_walks_ending_in",
    "state_labels",
    "walks_to_tokens",
]


def sample_walks(
    fsm: FSM,
    n_walks: int,
    n_steps: int,
    generator: torch.Generator | None = None,
) -> Int[Tensor, "walk step"]:
    """Sample ``n_walks`` random walks of ``n_steps`` states each.

    The start state is uniform over all states; each next state is a uniformly random successor
    of the current one. All walks advance together (one gather per step, no loop over walks).

    Args:
        fsm: The machine.
        n_walks: Number of walks (batch size).
        n_steps: Number of states per walk (>= 1).
        generator: CPU random generator; ``None`` uses torch's global generator.

    Returns:
        ``LongTensor [n_walks, n_steps]`` of state ids (on the CPU).
    """
    if n_walks < 0 or n_steps < 1:
        raise ValueError(f"need n_walks >= 0 and n_steps >= 1, got {n_walks}, {n_steps}")
    start = torch.randint(0, fsm.n_states, (n_walks,), generator=generator)
    choices = torch.randint(0, fsm.n_edges, (n_walks, n_steps - 1), generator=generator)
    states = torch.empty(n_walks, n_steps, dtype=torch.long)
    states[:, 0] = start
    succ = fsm.successors
    for t in range(1, n_steps):
        states[:, t] = succ[states[:, t - 1], choices[:, t - 1]]
    return states


def sample_walks_ending_in(
    fsm: FSM,
    last: Int[Tensor, " walk"],
    n_steps: int,
    generator: torch.Generator | None = None,
) -> Int[Tensor, "walk step"]:
    """Random walks of ``n_steps`` states that end in the given states, sampled backwards.

    Each earlier state is a uniformly random predecessor of the one after it, so every
    transition is an edge. A state without predecessors (possible only in tiny machines) gets a
    uniformly random state before it instead; such a walk is the one place an edge is missing.

    Returns:
        ``LongTensor [len(last), n_steps]`` of state ids with ``[:, -1] == last``.
    """
    if n_steps < 1:
        raise ValueError(f"need n_steps >= 1, got {n_steps}")
    last = torch.as_tensor(last, dtype=torch.long).cpu()
    pred = fsm.adjacency().t().float()  # [state, predecessor]
    pred[pred.sum(-1) == 0] = 1.0
    states = torch.empty(last.numel(), n_steps, dtype=torch.long)
    states[:, -1] = last
    for t in range(n_steps - 2, -1, -1):  # n_steps draws, each over all walks at once
        states[:, t] = torch.multinomial(pred[states[:, t + 1]], 1, generator=generator)[:, 0]
    return states


def walks_to_tokens(fsm: FSM, states: Int[Tensor, "walk step"]) -> Int[Tensor, "walk pos"]:
    """Write walks as token sequences ``[BOS, digits of s_0, digits of s_1, ...]``.

    Returns:
        ``LongTensor [n_walks, 1 + n_steps * n_digits]`` on the device of ``states``.
    """
    digits = fsm.states_to_tokens(states)
    bos = torch.full((*digits.shape[:-1], 1), fsm.bos, dtype=torch.long, device=digits.device)
    return torch.cat([bos, digits], dim=-1)


def state_labels(fsm: FSM, tokens: Int[Tensor, "*batch pos"]) -> Int[Tensor, "*batch pos"]:
    """Label each position with the state that has just been completed there.

    At the position of a state's last digit the label is that state's id; elsewhere (BOS, the
    earlier digits of a state, and a trailing incomplete state when the sequence was truncated)
    it is ``-1``. Position ``1 + i * n_digits + (n_digits - 1)`` carries the label of state ``i``.

    Args:
        fsm: The machine.
        tokens: Token sequences that start with BOS (``[..., pos]``).

    Raises:
        ValueError: if a sequence does not start with BOS or holds a non-digit token after it.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.shape[-1] < 1 or not bool((tokens[..., 0] == fsm.bos).all()):
        raise ValueError(f"every sequence must start with the BOS token ({fsm.bos})")
    nd = fsm.n_digits
    body = tokens[..., 1:]
    n_whole = body.shape[-1] // nd
    states = fsm.tokens_to_states(body[..., : n_whole * nd])  # [..., n_whole]
    labels = torch.full_like(tokens, -1)
    per_state = torch.full((*states.shape, nd), -1, dtype=torch.long, device=tokens.device)
    per_state[..., -1] = states
    labels[..., 1 : 1 + n_whole * nd] = per_state.flatten(-2)
    return labels


class TokFSMStream:
    """Infinite, seeded iterator of training batches generated on the fly.

    Each ``next()`` returns ``LongTensor [batch_size, 1 + n_steps * n_digits]`` (BOS first) on
    ``device``. Two streams with the same arguments yield the same batches.

    Args:
        fsm: The machine.
        batch_size: Walks per batch.
        n_steps: States per walk.
        seed: Seed of the stream's own CPU generator.
        device: Device the batches are moved to (sampling itself runs on the CPU).
    """

    def __init__(
        self,
        fsm: FSM,
        batch_size: int,
        n_steps: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1 or n_steps < 1:
            raise ValueError(f"need batch_size >= 1 and n_steps >= 1, got {batch_size}, {n_steps}")
        self.fsm = fsm
        self.batch_size = batch_size
        self.n_steps = n_steps
        self.seed = seed
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def seq_len(self) -> int:
        """Tokens per sequence: ``1 + n_steps * n_digits``."""
        return 1 + self.n_steps * self.fsm.n_digits

    def __iter__(self) -> TokFSMStream:
        return self

    def __next__(self) -> Int[Tensor, "batch pos"]:
        states = sample_walks(self.fsm, self.batch_size, self.n_steps, self.generator)
        tokens = walks_to_tokens(self.fsm, states)
        return tokens if self.device is None else tokens.to(self.device)


def eval_set(
    fsm: FSM,
    n_walks: int,
    n_steps: int,
    seed: int = 12345,
) -> Int[Tensor, "walk pos"]:
    """A fixed evaluation set: ``n_walks`` walks of ``n_steps`` states as tokens (BOS first).

    Deterministic in ``(fsm, n_walks, n_steps, seed)``; use a seed different from the training
    stream's. Returns ``LongTensor [n_walks, 1 + n_steps * n_digits]`` on the CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    return walks_to_tokens(fsm, sample_walks(fsm, n_walks, n_steps, gen))
