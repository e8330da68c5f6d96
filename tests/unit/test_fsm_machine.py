"""Unit tests for codebook_lens.fsm.machine (the TokFSM state machine)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens.fsm import FSM, n_digits_for


@st.composite
def fsm_args(draw):
    n_states = draw(st.integers(1, 60))
    n_edges = draw(st.integers(1, n_states))
    base = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    return n_states, n_edges, base, seed


def test_default_fsm_shapes_and_vocab():
    fsm = FSM()
    assert fsm.successors.shape == (100, 10)
    assert fsm.successors.dtype == torch.long
    assert fsm.n_digits == 2
    assert fsm.bos == 10
    assert fsm.d_vocab == 11


@pytest.mark.parametrize(
    ("n_states", "base", "expected"),
    [(1, 10, 1), (10, 10, 1), (11, 10, 2), (100, 10, 2), (101, 10, 3), (37, 4, 3), (64, 2, 6)],
)
def test_n_digits_for(n_states, base, expected):
    assert n_digits_for(n_states, base) == expected


@settings(max_examples=25, deadline=None)
@given(fsm_args())
def test_successors_distinct_in_range_and_deterministic(args):
    n_states, n_edges, base, seed = args
    fsm = FSM(n_states, n_edges, base, seed)
    s = fsm.successors
    assert s.shape == (n_states, n_edges)
    assert int(s.min()) >= 0 and int(s.max()) < n_states
    for row in s.tolist():
        assert len(set(row)) == n_edges
    assert torch.equal(s, FSM(n_states, n_edges, base, seed).successors)
    t = fsm.transition_matrix()
    torch.testing.assert_close(t.sum(1), torch.ones(n_states))
    assert int((t > 0).sum()) == n_states * n_edges


def test_different_seeds_differ():
    assert not torch.equal(FSM(seed=0).successors, FSM(seed=1).successors)


def test_successors_roughly_uniform_over_states():
    # 100 states x 10 edges -> each state is a successor 10 times on average over the machine.
    counts = torch.zeros(100)
    for seed in range(20):
        counts += torch.bincount(FSM(seed=seed).successors.flatten(), minlength=100)
    # 200 expected per state; binomial sd ~ 13.4
    assert counts.min() > 140 and counts.max() < 260


def test_is_edge_matches_transition_matrix():
    fsm = FSM(n_states=20, n_edges=4, seed=3)
    a = torch.arange(20).repeat_interleave(20)
    b = torch.arange(20).repeat(20)
    expected = fsm.transition_matrix()[a, b] > 0
    assert torch.equal(fsm.is_edge(a, b), expected)
    assert torch.equal(fsm.adjacency().flatten(), expected)
    # broadcasting, ints and out-of-range states
    s0 = int(fsm.successors[0, 0])
    assert bool(fsm.is_edge(0, s0))
    assert fsm.is_edge(torch.tensor([[0], [1]]), torch.arange(20)).shape == (2, 20)
    assert not bool(fsm.is_edge(-1, s0)) and not bool(fsm.is_edge(0, 20))


def test_states_to_tokens_values():
    fsm = FSM()
    toks = fsm.states_to_tokens(torch.tensor([[7, 42, 99, 0]]))
    assert toks.tolist() == [[0, 7, 4, 2, 9, 9, 0, 0]]
    assert fsm.tokens_to_states(toks).tolist() == [[7, 42, 99, 0]]
    fsm3 = FSM(n_states=37, n_edges=3, base=4)
    assert fsm3.states_to_tokens(torch.tensor([36, 5])).tolist() == [2, 1, 0, 0, 1, 1]


@settings(max_examples=25, deadline=None)
@given(fsm_args(), st.integers(0, 3), st.integers(1, 6), st.integers(0, 1000))
def test_tokens_states_round_trip(args, n_batch_dims, length, seed):
    n_states, n_edges, base, _ = args
    fsm = FSM(n_states, n_edges, base, 0)
    shape = (2,) * n_batch_dims + (length,)
    gen = torch.Generator().manual_seed(seed)
    states = torch.randint(0, n_states, shape, generator=gen)
    toks = fsm.states_to_tokens(states)
    assert toks.shape == (*shape[:-1], length * fsm.n_digits)
    assert int(toks.max()) < base
    assert torch.equal(fsm.tokens_to_states(toks), states)


def test_tokens_states_errors():
    fsm = FSM()
    with pytest.raises(ValueError, match="multiple of n_digits"):
        fsm.tokens_to_states(torch.tensor([10, 1, 2]))
    with pytest.raises(ValueError, match="BOS"):
        fsm.tokens_to_states(torch.tensor([10, 1]))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        fsm.states_to_tokens(torch.tensor([100]))


def test_constructor_errors():
    with pytest.raises(ValueError, match="n_edges"):
        FSM(n_states=5, n_edges=6)
    with pytest.raises(ValueError, match="base"):
        FSM(base=1)
    with pytest.raises(TypeError, match="n_states"):
        FSM(n_states=10.0)


def test_json_round_trip(tmp_path):
    fsm = FSM(n_states=30, n_edges=5, base=7, seed=11)
    path = tmp_path / "sub" / "fsm.json"
    fsm.save(path)
    d = json.loads(path.read_text())
    assert list(d) == ["n_states", "n_edges", "base", "seed", "successors"]
    assert d["successors"] == fsm.successors.tolist()
    loaded = FSM.load(path)
    assert loaded == fsm
    assert loaded.n_digits == 2
    assert FSM.from_dict(fsm.to_dict()) == fsm
    # no temporary files left behind
    assert [p.name for p in path.parent.iterdir()] == ["fsm.json"]


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "fsm.json"
    FSM(seed=1).save(path)
    FSM(seed=2).save(path)
    assert FSM.load(path) == FSM(seed=2)


def _write(tmp_path, d):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d) if not isinstance(d, str) else d)
    return p


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("seed"), r"missing \['seed'\]"),
        (lambda d: d.update(extra=1), r"unknown \['extra'\]"),
        (lambda d: d.update(n_edges="3"), "'n_edges' must be an int"),
        (lambda d: d["successors"][2].__setitem__(1, d["successors"][2][0]), "distinct"),
        (lambda d: d["successors"][1].__setitem__(0, 6), r"\[0, 6\)"),
        (lambda d: d["successors"][1].__setitem__(0, -1), r"\[0, 6\)"),
        (lambda d: d["successors"].pop(), "6 rows of 3"),
        (lambda d: d["successors"][0].append(0), "6 rows of 3"),
        (lambda d: d.update(successors=[[0.5] * 3] * 6), "only ints"),
        (lambda d: d.update(successors="x"), "list of lists"),
    ],
)
def test_load_errors(tmp_path, mutate, match):
    d = FSM(n_states=6, n_edges=3, seed=0).to_dict()
    mutate(d)
    with pytest.raises(ValueError, match=match):
        FSM.load(_write(tmp_path, d))


def test_load_not_json(tmp_path):
    with pytest.raises(ValueError, match="not a valid FSM JSON"):
        FSM.load(_write(tmp_path, "{not json"))
    with pytest.raises(ValueError, match="JSON object"):
        FSM.load(_write(tmp_path, [1, 2]))
    with pytest.raises(FileNotFoundError):
        FSM.load(tmp_path / "missing.json")
