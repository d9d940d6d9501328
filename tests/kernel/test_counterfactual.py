"""Candidate edits of the counterfactual query, checked against tables worked by hand."""

from __future__ import annotations

import torch

from dda_kernel import apply_edit, apply_span, best_edit, changed_words, edit_candidates, word_spans


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


def test_word_spans_run_from_each_word_start_to_the_next_within_the_editable_tokens():
    """Tokens 0..5 with words starting at 0, 2 and 5; 5 editable tokens (the EOS at 5 is not): [0, 2), [2, 5)."""
    starts = [True, False, True, False, False, True]
    assert word_spans(starts, 5) == [(0, 2), (2, 5)]
    assert word_spans(starts, 6) == [(0, 2), (2, 5), (5, 6)]
    assert word_spans([False, False], 2) == [(0, 2)]  # the first token always begins a word
    assert word_spans([], 0) == []


def test_changed_words_are_the_multi_token_words_fine_tuning_made_most_likely():
    """Words ranked by Σ delta over their tokens (delta_r = log p_θt(y_r) − log p_θ0(y_r)); the top ``count`` kept
    where their sum is positive and they have several tokens."""
    delta = torch.tensor([0.5, 0.5, 3.0, 2.0, -1.0, 4.0])
    words = [(0, 2), (2, 4), (4, 5), (5, 6)]  # sums 1.0, 5.0, −1.0, 4.0
    assert changed_words(delta, words, 1) == [(2, 4)]
    assert changed_words(delta, words, 2) == [(2, 4)]  # (5, 6) is one token
    assert changed_words(delta, words, 3) == [(2, 4), (0, 2)]
    assert changed_words(-delta, words, 4) == []  # θ_0 prefers every word of several tokens


def test_apply_span_replaces_a_run_of_tokens_by_one_of_another_length():
    assert apply_span([1, 2, 3, 4], (1, 3, (7,))) == [1, 7, 4]
    assert apply_span([1, 2, 3, 4], (1, 2, (7, 8, 9))) == [1, 7, 8, 9, 3, 4]
    assert apply_span([1, 2, 3, 4], (2, 3, (5,))) == apply_edit([1, 2, 3, 4], (2, 5))
