"""Debias and denoise: zeros when base == finetuned, running state == brute force, merge order-free."""

from __future__ import annotations

import itertools

import pytest
import torch

from dda_kernel import (
    StateError,
    checkpoint_weights,
    dda_init,
    dda_merge,
    dda_update,
    dda_value,
    debias,
    normalise_scores,
    pairwise_scores,
    row_norms,
)


def _scores(seed: int, shape=(3, 40)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * (seed + 1)


@pytest.mark.parametrize("kind", ["none", "zscore", "cosine"])
def test_debias_is_zero_when_base_equals_finetuned(kind):
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(3, 16, generator=gen), torch.randn(40, 16, generator=gen)
    s = pairwise_scores(q, g)
    norm = normalise_scores(s, kind, row_norms(q), row_norms(g))
    assert torch.count_nonzero(debias(norm, norm, 1.0)) == 0


def test_normalisations_match_their_formulas():
    gen = torch.Generator().manual_seed(1)
    q, g = torch.randn(2, 8, generator=gen, dtype=torch.float64), torch.randn(30, 8, generator=gen, dtype=torch.float64)
    s = q @ g.T
    cos = torch.nn.functional.cosine_similarity(q[:, None, :], g[None, :, :], dim=-1)
    torch.testing.assert_close(normalise_scores(s, "cosine", row_norms(q), row_norms(g)), cos)
    z = normalise_scores(s, "zscore")
    mean, std = s.mean(dim=1, keepdim=True), s.std(dim=1, unbiased=False, keepdim=True)
    torch.testing.assert_close(z, (s - mean) / std, rtol=1e-12, atol=1e-12)  # (s − mean) / std, per query
    torch.testing.assert_close(debias(s, 2 * s, 0.5), torch.zeros_like(s))


@pytest.mark.parametrize("standardise", [False, True])
def test_running_state_equals_brute_force_weighted_mean(standardise):
    scores = [_scores(t) for t in range(5)]
    weights = checkpoint_weights([3e-4, 2e-4, 1e-4, 5e-5, 1e-5], "lr")
    state = dda_init(3, 40)
    for t, (s, w) in enumerate(zip(scores, weights, strict=True)):
        state = dda_update(state, f"ckpt-{t}", s, w, standardise=standardise)
    used = [normalise_scores(s, "zscore") if standardise else s for s in scores]
    brute = sum(w * s for w, s in zip(weights, used, strict=True)) / sum(weights)
    assert state.n_checkpoints == 5
    torch.testing.assert_close(dda_value(state), brute, rtol=1e-12, atol=1e-12)


def test_merge_in_any_order_gives_the_same_state():
    parts = [dda_update(dda_init(3, 40), f"c{t}", _scores(t), 1.0 + t) for t in range(4)]
    values = []
    for perm in itertools.permutations(parts):
        merged = perm[0]
        for p in perm[1:]:
            merged = dda_merge(merged, p)
        values.append(dda_value(merged))
    tree = dda_merge(dda_merge(parts[0], parts[1]), dda_merge(parts[2], parts[3]))
    for v in values:
        torch.testing.assert_close(v, dda_value(tree), rtol=1e-13, atol=1e-13)


def test_state_refuses_double_counting_and_bad_shapes():
    state = dda_update(dda_init(3, 40), "c0", _scores(0))
    with pytest.raises(StateError, match="already in the DDA state"):
        dda_update(state, "c0", _scores(1))
    with pytest.raises(StateError, match="both count checkpoints"):
        dda_merge(state, state)
    with pytest.raises(StateError, match="do not fit"):
        dda_update(state, "c1", _scores(1, shape=(3, 41)))
    with pytest.raises(StateError, match="no checkpoint yet"):
        dda_value(dda_init(3, 40))
    assert checkpoint_weights([1e-4, 2e-4]) == [1.0, 1.0]
