"""Candidate edits of the counterfactual query, checked against tables worked by hand."""

from __future__ import annotations

import torch

from dda_kernel import apply_edit, best_edit, edit_candidates


def _table(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_candidates_are_the_positions_of_largest_flip_with_their_best_alternatives():
    # y = (0, 1, 2); flip_r = max_{a≠y_r} J[r, a] − J[r, y_r]: r0: −1 − 0 = −1, r1: −2 − (−5) = 3, r2: −3 − (−4) = 1
    joint = _table([[0, -1, -9, -9], [-2, -5, -3, -9], [-9, -3, -4, -6]])
    response = torch.tensor([0, 1, 2])
    got = edit_candidates(joint, response, editable=3, positions=2, alternatives=2)
    assert got.tolist() == [[1, 0], [1, 2], [2, 1], [2, 3]]


def test_the_output_token_itself_and_positions_past_editable_are_never_candidates():
    joint = _table([[0, -1, -2], [-1, 0, -2], [5, 5, 5]])
    response = torch.tensor([0, 1, 2])
    got = edit_candidates(joint, response, editable=2, positions=5, alternatives=5)
    assert sorted(map(tuple, got.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 2)]
    assert edit_candidates(joint, response, editable=0).shape == (0, 2)


def test_ties_in_flip_go_to_the_earlier_position_and_the_best_edit_is_the_first_largest_gain():
    joint = _table([[0, -1], [0, -1], [0, -1]])  # y = (1, 1, 1): every flip is 1
    got = edit_candidates(joint, torch.tensor([1, 1, 1]), editable=3, positions=2, alternatives=1)
    assert got.tolist() == [[0, 0], [1, 0]]
    assert best_edit(got, torch.tensor([2.0, 2.0])) == (0, 0)
    assert best_edit(got, torch.tensor([1.0, 2.0])) == (1, 0)
    assert apply_edit([7, 8, 9], (1, 4)) == [7, 4, 9]
