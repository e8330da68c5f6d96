"""Unit tests for codebook_lens.fsm.data (walks, tokens, labels, streams)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens.fsm import (
    FSM,
    TokFSMStream,
    eval_set,
    sample_walks,
    sample_walks_ending_in,
    state_labels,
    walks_to_tokens,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_walks_use_only_edges_and_are_deterministic():
    fsm = FSM()
    w = sample_walks(fsm, 50, 40, _gen(1))
    assert w.shape == (50, 40) and w.dtype == torch.long
    adj = fsm.adjacency()
    assert bool(adj[w[:, :-1], w[:, 1:]].all())
    assert torch.equal(w, sample_walks(fsm, 50, 40, _gen(1)))
    assert not torch.equal(w, sample_walks(fsm, 50, 40, _gen(2)))


def test_walk_transitions_roughly_uniform_over_successors():
    fsm = FSM(n_states=5, n_edges=4, seed=0)
    w = sample_walks(fsm, 2000, 11, _gen(0))
    a, b = w[:, :-1].flatten(), w[:, 1:].flatten()
    counts = torch.zeros(5, 5).index_put_((a, b), torch.ones(a.numel()), accumulate=True)
    freq = counts / counts.sum(1, keepdim=True)
    # 20,000 transitions, ~4,000 per source state: each successor ~0.25 +- 0.007
    torch.testing.assert_close(freq, fsm.transition_matrix(), atol=0.03, rtol=0)
    # start states uniform
    starts = torch.bincount(w[:, 0], minlength=5).float() / 2000
    torch.testing.assert_close(starts, torch.full((5,), 0.2), atol=0.04, rtol=0)


def test_backward_walks_end_in_the_given_states_along_edges():
    fsm = FSM()
    last = torch.arange(100).repeat(3)
    w = sample_walks_ending_in(fsm, last, 9, _gen(0))
    assert w.shape == (300, 9) and torch.equal(w[:, -1], last)
    assert bool(fsm.adjacency()[w[:, :-1], w[:, 1:]].all())
    assert torch.equal(w, sample_walks_ending_in(fsm, last, 9, _gen(0)))
    # predecessors are drawn uniformly: every predecessor of state 0 shows up
    w0 = sample_walks_ending_in(fsm, torch.zeros(2000, dtype=torch.long), 2, _gen(1))
    preds = fsm.adjacency()[:, 0].nonzero().flatten()
    assert set(w0[:, 0].tolist()) == set(preds.tolist())


def test_backward_walks_survive_states_without_predecessors():
    fsm = FSM(n_states=3, n_edges=1, successors=torch.tensor([[1], [2], [1]]))
    w = sample_walks_ending_in(fsm, torch.tensor([0, 0]), 3, _gen(0))
    assert w[:, -1].tolist() == [0, 0]  # state 0 has no predecessor: a random state before it
    assert bool(fsm.adjacency()[w[:, 0], w[:, 1]].all())  # earlier steps follow edges again


def test_walks_to_tokens_layout():
    fsm = FSM()
    states = torch.tensor([[3, 57], [99, 10]])
    toks = walks_to_tokens(fsm, states)
    assert toks.tolist() == [[10, 0, 3, 5, 7], [10, 9, 9, 1, 0]]
    assert torch.equal(fsm.tokens_to_states(toks[:, 1:]), states)


def _labels_brute(fsm, tokens):
    out = []
    for row in tokens.tolist():
        lab = [-1] * len(row)
        for i in range((len(row) - 1) // fsm.n_digits):
            digits = row[1 + i * fsm.n_digits : 1 + (i + 1) * fsm.n_digits]
            value = 0
            for d in digits:
                value = value * fsm.base + d
            lab[i * fsm.n_digits + fsm.n_digits] = value
        out.append(lab)
    return out


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([(100, 10, 10), (37, 3, 4), (8, 2, 2), (9, 9, 10)]),
    st.integers(1, 12),
    st.integers(0, 3),
    st.integers(0, 10_000),
)
def test_state_labels_match_brute_force(machine, n_steps, truncate, seed):
    fsm = FSM(*machine, seed=seed)
    toks = walks_to_tokens(fsm, sample_walks(fsm, 4, n_steps, _gen(seed)))
    toks = toks[:, : max(1, toks.shape[1] - truncate)]  # truncation leaves a partial state
    labels = state_labels(fsm, toks)
    assert labels.shape == toks.shape
    assert labels.tolist() == _labels_brute(fsm, toks)


def test_state_labels_values_and_errors():
    fsm = FSM()
    toks = walks_to_tokens(fsm, torch.tensor([[3, 57, 42]]))
    assert state_labels(fsm, toks).tolist() == [[-1, -1, 3, -1, 57, -1, 42]]
    assert state_labels(fsm, toks[0]).tolist() == [-1, -1, 3, -1, 57, -1, 42]
    with pytest.raises(ValueError, match="start with the BOS"):
        state_labels(fsm, toks[:, 1:])


def test_stream_is_seeded_infinite_and_valid():
    fsm = FSM()
    s1, s2 = TokFSMStream(fsm, 8, 16, seed=3), TokFSMStream(fsm, 8, 16, seed=3)
    b1 = [next(s1) for _ in range(3)]
    b2 = [next(s2) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(b1, b2))
    assert not torch.equal(b1[0], b1[1])
    assert b1[0].shape == (8, 33) and s1.seq_len == 33
    assert bool((b1[0][:, 0] == fsm.bos).all())
    states = fsm.tokens_to_states(b1[0][:, 1:])
    assert bool(fsm.is_edge(states[:, :-1], states[:, 1:]).all())
    assert iter(s1) is s1


def test_eval_set_fixed():
    fsm = FSM()
    e1, e2 = eval_set(fsm, 16, 8, seed=5), eval_set(fsm, 16, 8, seed=5)
    assert e1.shape == (16, 17) and torch.equal(e1, e2)
    assert not torch.equal(e1, eval_set(fsm, 16, 8, seed=6))


def test_bad_sizes():
    fsm = FSM()
    with pytest.raises(ValueError):
        sample_walks(fsm, 2, 0)
    with pytest.raises(ValueError):
        TokFSMStream(fsm, 0, 4)
