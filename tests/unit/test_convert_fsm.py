"""Reading the reference implementation's TokFSM ``fsm.npy`` into our FSM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from codebook_lens.fsm import FSM

NPY = Path(__file__).resolve().parents[1] / "fixtures" / "codebook_features" / "tokfsm" / "fsm.npy"


def test_reference_fsm_npy_round_trips_its_transition_matrix():
    fsm = FSM.load_npy(NPY)
    matrix = np.load(NPY, allow_pickle=False)
    assert (fsm.n_states, fsm.n_edges, fsm.base, fsm.n_digits) == (20, 4, 10, 2)
    np.testing.assert_array_equal(fsm.transition_matrix().double().numpy(), matrix)
    a, b = np.nonzero(matrix)
    assert fsm.is_edge(torch.from_numpy(a), torch.from_numpy(b)).all()
    assert fsm == FSM.from_dict(fsm.to_dict())


def test_from_transition_matrix_matches_our_own_machine():
    ours = FSM(n_states=12, n_edges=3, seed=4)
    again = FSM.from_transition_matrix(ours.transition_matrix().numpy(), seed=4)
    assert torch.equal(again.adjacency(), ours.adjacency())


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        (np.ones((2, 3)) / 3, "square"),
        (np.array([[0.5, 0.5], [1.0, 0.0]]), "row 1 .* 1 non-zero"),
        (np.array([[0.7, 0.3], [0.5, 0.5]]), "row 0 of the transition matrix is not uniform"),
        (np.array([[np.nan, 1.0], [0.5, 0.5]]), "finite"),
    ],
)
def test_bad_matrices_are_refused(matrix, match):
    with pytest.raises(ValueError, match=match):
        FSM.from_transition_matrix(matrix)


def test_pickled_npy_is_refused(tmp_path):
    bad = tmp_path / "fsm.npy"
    np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a numeric .npy array"):
        FSM.load_npy(bad)
