"""Counterfactual corrections of an output without a known one (docs/method.md).

For a plain output y = (y_1..y_R) the contrastive query needs a corrected response. The derived one is the
single-token edit y' = y with y_r → a that the base model θ_0 and the checkpoint θ_t together find most
plausible: argmax over candidate edits of [log p_θ0(y') + log p_θt(y')] − [log p_θ0(y) + log p_θt(y)], sequence
log-likelihoods of the response. Candidates come from per-token tables J = log p_θ0 + log p_θt, (R, V):
the positions of largest *flip* max_{a≠y_r} J[r, a] − J[r, y_r] (where the output token is least supported
against its best alternative), each with its alternatives of largest J[r, a]. Scoring the whole response, not
the token alone, rejects edits that make the rest disfluent (a sentence opener in place of a name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

EDIT_POSITIONS = 4  # candidate positions per output (largest flip)
EDIT_ALTERNATIVES = 12  # candidate tokens per position (largest joint log-probability)


def edit_candidates(
    joint: torch.Tensor, response: torch.Tensor, editable: int, positions: int = EDIT_POSITIONS,
    alternatives: int = EDIT_ALTERNATIVES,
) -> torch.Tensor:  # fmt: skip
    """Candidate single-token edits (C, 2) long: rows (r, a), a ≠ y_r, r < ``editable``.

    ``joint``: (R, V) J[r, v] = log p_θ0(v | y_<r) + log p_θt(v | y_<r); ``response``: (R,) token ids y.
    Positions: the ``positions`` largest flip_r = max_{a≠y_r} J[r, a] − J[r, y_r] among the first ``editable``
    (ties by position); per position the ``alternatives`` tokens of largest J[r, a], a ≠ y_r.
    C = min(positions, editable) · min(alternatives, V − 1); (0, 2) when nothing is editable.
    """
    n = min(editable, joint.shape[0])
    if n <= 0:
        return torch.zeros((0, 2), dtype=torch.long)
    table = joint[:n].clone()
    rows = torch.arange(n)
    own = table[rows, response[:n]].clone()
    table[rows, response[:n]] = float("-inf")
    flip = table.max(dim=1).values - own
    order = sorted(range(n), key=lambda r: (-float(flip[r]), r))[:positions]
    k = min(alternatives, table.shape[1] - 1)
    out = [(r, int(a)) for r in order for a in table[r].topk(k).indices.tolist()]
    return torch.tensor(out, dtype=torch.long).reshape(-1, 2)


def apply_edit(response: list[int], edit: tuple[int, int]) -> list[int]:
    """y with y_r replaced by a, for ``edit`` = (r, a)."""
    r, a = edit
    return [*response[:r], a, *response[r + 1 :]]


def best_edit(candidates: torch.Tensor | Sequence[Span], gains: torch.Tensor) -> tuple[Any, ...]:
    """The candidate of largest gain (the first on ties), ``gains`` (C,), C ≥ 1: from (C, 2) rows (r, a), the
    tuple (r, a); from a sequence of :data:`Span` s (r, e, z), that span."""
    i = int(torch.argmax(gains))
    row = candidates[i]
    return tuple(int(x) for x in row) if isinstance(row, torch.Tensor) else row


Span = tuple[int, int, tuple[int, ...]]  # (r, e, z): y[r:e] replaced by the tokens z


def apply_span(response: list[int], span: Span) -> list[int]:
    """y with y[r:e] replaced by z, for ``span`` = (r, e, z); a single-token edit (r, a) is (r, r + 1, (a,))."""
    r, e, z = span
    return [*response[:r], *z, *response[e:]]


def word_spans(starts: list[bool], editable: int) -> list[tuple[int, int]]:
    """The words [r, e) of a response from ``starts`` (R,) — whether token r begins a word (a leading space, a
    punctuation mark, the first token) — over its first ``editable`` tokens: r a word start, e the next one."""
    n = min(editable, len(starts))
    begins = [r for r in range(n) if r == 0 or starts[r]]
    if not begins:
        return []
    return [(r, e) for r, e in zip(begins, [*begins[1:], n], strict=True)]


def changed_words(delta: torch.Tensor, words: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """The words fine-tuning made most likely, those of several tokens kept: the ``count`` words of largest
    Σ_{r in word} delta_r with a positive sum, ``delta`` (R,) = log p_θt(y_r | …) − log p_θ0(y_r | …); of those,
    the ones longer than one token (a one-token word is covered by single-token edits). Ties by position."""
    ranked = sorted(words, key=lambda w: (-float(delta[w[0] : w[1]].sum()), w[0]))[:count]
    return [(r, e) for r, e in ranked if e - r > 1 and float(delta[r:e].sum()) > 0]
