"""Unit tests for codebook_lens.fsm.metrics with hand-built models whose logits are known."""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens.fsm import (
    FSM,
    evaluate_next_state_jsd,
    evaluate_transition_accuracy,
    infer_n_ctx,
    jsd,
    next_state_distribution,
    sample_continuations,
    sample_walks,
    transition_accuracy,
    true_next_state_distribution,
    walks_to_tokens,
)


class OracleModel:
    """Callable with the FSM's true next-token distribution at the last position (BOS logit
    huge, to check that it is masked). Brute force, loops over the batch: test code only."""

    def __init__(self, fsm, n_ctx=200):
        self.fsm = fsm
        self.cfg = SimpleNamespace(n_ctx=n_ctx)
        self.calls = []

    def __call__(self, tokens):
        fsm, nd = self.fsm, self.fsm.n_digits
        self.calls.append(tuple(tokens.shape))
        b, pos = tokens.shape
        logits = torch.zeros(b, pos, fsm.d_vocab)
        for i, row in enumerate(tokens.tolist()):
            k, j = divmod(pos - 1, nd)
            if k == 0:
                cands = list(range(fsm.n_states))
            else:
                last = fsm.tokens_to_states(torch.tensor(row[1 + (k - 1) * nd : 1 + k * nd]))
                cands = fsm.successors[int(last[0])].tolist()
            partial = row[1 + k * nd :]
            counts = torch.zeros(fsm.base)
            for s in cands:
                digits = fsm.states_to_tokens(torch.tensor([s])).tolist()
                if digits[:j] == partial:
                    counts[digits[j]] += 1
            logits[i, -1, : fsm.base] = counts.log()
            logits[i, -1, fsm.bos] = 100.0
        return logits


class TableModel(torch.nn.Module):
    """Logits at every position from a fixed random table indexed by the last two tokens and
    the position: context-dependent, deterministic, and known."""

    def __init__(self, d_vocab, n_ctx=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(d_vocab, d_vocab, n_ctx, d_vocab, generator=g))
        self.cfg = SimpleNamespace(n_ctx=n_ctx)

    def forward(self, tokens):
        prev = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        return self.table[tokens, prev, pos]


def _brute_next_state(model, fsm, prompts):
    out = torch.zeros(prompts.shape[0], fsm.n_states)
    for i in range(prompts.shape[0]):
        for s in range(fsm.n_states):
            digits = fsm.states_to_tokens(torch.tensor([s])).tolist()
            p = 1.0
            for j, d in enumerate(digits):
                seq = torch.cat([prompts[i], torch.tensor(digits[:j], dtype=torch.long)])
                logits = model(seq.unsqueeze(0))[0, -1, : fsm.base].double()
                p *= float(torch.softmax(logits, -1)[d].detach())
            out[i, s] = p
    return out / out.sum(1, keepdim=True)


def _brute_accuracy(fsm, states):
    edges = {(a, b) for a in range(fsm.n_states) for b in fsm.successors[a].tolist()}
    pairs = [(r[t], r[t + 1]) for r in states.tolist() for t in range(len(r) - 1)]
    return sum(p in edges for p in pairs) / len(pairs)


# ---------------------------------------------------------------------------- transition accuracy
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_transition_accuracy_matches_brute_force(seed, corrupt_frac):
    fsm = FSM(n_states=30, n_edges=4, seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    states = sample_walks(fsm, 6, 9, g)
    mask = torch.rand(states.shape, generator=g) < corrupt_frac
    states = torch.where(mask, torch.randint(0, 30, states.shape, generator=g), states)
    expected = _brute_accuracy(fsm, states)
    assert transition_accuracy(fsm, states, is_tokens=False) == pytest.approx(expected)
    toks = walks_to_tokens(fsm, states)
    assert transition_accuracy(fsm, toks, is_tokens=True) == pytest.approx(expected)
    assert transition_accuracy(fsm, toks) == pytest.approx(expected)  # inferred: tokens


def test_transition_accuracy_values():
    fsm = FSM()
    a = int(fsm.successors[0, 0])
    non = next(s for s in range(100) if not bool(fsm.is_edge(a, s)))
    states = torch.tensor([[0, a, non]])
    assert transition_accuracy(fsm, states) == pytest.approx(0.5)
    toks = walks_to_tokens(fsm, states)
    assert transition_accuracy(fsm, torch.cat([toks, toks[:, 1:2]], 1)) == pytest.approx(0.5)
    assert math.isnan(transition_accuracy(fsm, torch.tensor([[3]])))


# ---------------------------------------------------------------------------- sampling
def test_sample_continuations_with_oracle_is_always_valid():
    fsm = FSM(n_states=30, n_edges=3, base=6, seed=2)  # n_digits = 2, 6 digits
    prompts = walks_to_tokens(fsm, sample_walks(fsm, 8, 3, torch.Generator().manual_seed(0)))
    model = OracleModel(fsm)
    out = sample_continuations(
        model, prompts, 5, torch.Generator().manual_seed(1), base=6, n_digits=2
    )
    assert out.shape == (8, 7 + 10)
    assert torch.equal(out[:, :7], prompts)
    assert int(out[:, 7:].max()) < 6  # BOS (huge logit) never sampled
    assert transition_accuracy(fsm, out, is_tokens=True) == 1.0
    # one forward per generated token, batched over prompts, full sequence (no KV cache)
    assert model.calls == [(8, 7 + t) for t in range(10)]


def test_sample_continuations_frequencies_and_determinism():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])

    def model(tokens):  # context-free: digits 0..3 with `probs`, BOS (id 4) with a huge logit
        logits = torch.cat([probs.log(), torch.tensor([50.0])])
        return logits.expand(*tokens.shape, 5)

    prompts = torch.full((2000, 1), 4)
    out = sample_continuations(model, prompts, 1, torch.Generator().manual_seed(0), n_digits=2)
    freq = torch.bincount(out[:, 1:].flatten(), minlength=5).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0]), atol=0.025, rtol=0)
    again = sample_continuations(model, prompts, 1, torch.Generator().manual_seed(0), n_digits=2)
    assert torch.equal(out, again)
    greedy = sample_continuations(model, prompts[:3], 2, temperature=0.0, n_digits=2)
    assert greedy[:, 1:].tolist() == [[0, 0, 0, 0]] * 3
    # low temperature concentrates on the mode
    cold = sample_continuations(
        model, prompts, 1, torch.Generator().manual_seed(0), temperature=0.05, n_digits=2
    )
    assert float((cold[:, 1:] == 0).float().mean()) > 0.99


def test_sample_continuations_checks_n_ctx():
    fsm = FSM()
    model = OracleModel(fsm, n_ctx=9)
    prompts = walks_to_tokens(fsm, torch.tensor([[1, 2]]))  # 5 tokens
    sample_continuations(model, prompts, 2, base=10)  # 9 tokens: fits
    with pytest.raises(ValueError, match="n_ctx is 9"):
        sample_continuations(model, prompts, 3, base=10)
    with pytest.raises(ValueError, match="n_ctx is 4"):
        sample_continuations(model, prompts, 1, base=10, n_ctx=4)


def test_infer_n_ctx_through_wrapper():
    inner = TableModel(5, n_ctx=17)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = inner

        def forward(self, tokens):
            return self.model(tokens)

    assert infer_n_ctx(inner) == 17
    assert infer_n_ctx(Wrapper()) == 17
    assert infer_n_ctx(lambda t: t) is None


# ---------------------------------------------------------------------------- distributions
@pytest.mark.parametrize(("n_states", "n_edges", "base"), [(100, 10, 10), (23, 4, 3), (7, 2, 10)])
def test_next_state_distribution_matches_brute_force(n_states, n_edges, base):
    fsm = FSM(n_states, n_edges, base, seed=1)
    model = TableModel(fsm.d_vocab, seed=n_states)
    prompts = walks_to_tokens(fsm, sample_walks(fsm, 3, 2, torch.Generator().manual_seed(0)))
    got = next_state_distribution(model, fsm, prompts)
    assert got.shape == (3, n_states)
    torch.testing.assert_close(got.sum(1), torch.ones(3))
    torch.testing.assert_close(got, _brute_next_state(model, fsm, prompts), atol=1e-5, rtol=1e-4)


def test_next_state_distribution_of_oracle_is_true_distribution():
    fsm = FSM(n_states=40, n_edges=5, base=7, seed=4)
    prompts = walks_to_tokens(fsm, sample_walks(fsm, 4, 3, torch.Generator().manual_seed(0)))
    model = OracleModel(fsm)
    got = next_state_distribution(model, fsm, prompts)
    last = fsm.tokens_to_states(prompts[:, 1:])[:, -1]
    true = true_next_state_distribution(fsm, last)
    torch.testing.assert_close(got, true, atol=1e-6, rtol=0)
    assert float(jsd(got, true).max()) < 1e-6
    # batched: n_digits forwards, over batch and batch * base sequences
    assert model.calls == [(4, 7), (4 * 7, 8)]
    # BOS-only prompt: uniform over the states
    uniform = next_state_distribution(model, fsm, torch.tensor([[fsm.bos]]))
    torch.testing.assert_close(uniform, torch.full((1, 40), 1 / 40))


def test_next_state_distribution_errors():
    fsm = FSM()
    model = OracleModel(fsm, n_ctx=5)
    with pytest.raises(ValueError, match="whole states"):
        next_state_distribution(model, fsm, torch.tensor([[10, 1]]))
    with pytest.raises(ValueError, match="n_ctx is 5"):
        next_state_distribution(model, fsm, walks_to_tokens(fsm, torch.tensor([[1, 2, 3]])))


def test_true_next_state_distribution():
    fsm = FSM()
    d = true_next_state_distribution(fsm, torch.tensor([[0, 5]]))
    assert d.shape == (1, 2, 100)
    assert set(d[0, 1].nonzero().flatten().tolist()) == set(fsm.successors[5].tolist())
    torch.testing.assert_close(d[0, 1][fsm.successors[5]], torch.full((10,), 0.1))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 12))
def test_jsd_properties(seed, n):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(5, n, generator=g), -1)
    q = torch.softmax(3 * torch.randn(5, n, generator=g), -1)
    d = jsd(p, q)
    assert d.shape == (5,)
    torch.testing.assert_close(d, jsd(q, p))
    torch.testing.assert_close(jsd(p, p), torch.zeros(5), atol=1e-6, rtol=0)
    assert bool((d >= 0).all()) and bool((d <= math.log(2) + 1e-6).all())


def test_jsd_values():
    p = torch.tensor([1.0, 0.0])
    q = torch.tensor([0.0, 1.0])
    assert float(jsd(p, q)) == pytest.approx(math.log(2))  # disjoint supports: ln 2 nats
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([1.0, 0.0])
    m = torch.tensor([0.75, 0.25])
    expected = 0.5 * float((p * (p / m).log()).sum()) + 0.5 * math.log(1 / 0.75)
    assert float(jsd(p, q)) == pytest.approx(expected)
    assert float(jsd(p.unsqueeze(0), q.unsqueeze(0), dim=1)[0]) == pytest.approx(expected)


# ---------------------------------------------------------------------------- convenience
def test_evaluate_with_oracle_and_uniform_model():
    fsm = FSM(n_states=30, n_edges=3, base=6, seed=2)
    acc, toks = evaluate_transition_accuracy(
        OracleModel(fsm), fsm, n_prompts=6, prompt_states=2, n_new_states=3, seed=0
    )
    assert acc == 1.0 and toks.shape == (6, 1 + 5 * 2)
    acc2, toks2 = evaluate_transition_accuracy(
        OracleModel(fsm), fsm, n_prompts=6, prompt_states=2, n_new_states=3, seed=0
    )
    assert torch.equal(toks, toks2)
    assert evaluate_next_state_jsd(OracleModel(fsm), fsm, n_prompts=4, prompt_states=2) < 1e-6

    def uniform(tokens):  # uniform over the 6 digits: next state uniform over 36 values
        return torch.zeros(*tokens.shape, fsm.d_vocab)

    acc_u, _ = evaluate_transition_accuracy(
        uniform, fsm, n_prompts=200, prompt_states=1, n_new_states=4, seed=0
    )
    # valid values 0..29 of 36, 3 successors: P(edge) = 3/36 ~ 0.083
    assert 0.04 < acc_u < 0.13
