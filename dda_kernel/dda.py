"""The running, mergeable DDA denoise state (docs/method.md).

S(q, i) = Σ_t w_t s_t^db(q, i) / Σ_t w_t, kept as an immutable value (weighted sum, total weight,
the set of checkpoints counted). ``dda_update`` adds one checkpoint in O(m·n) without touching the
others; ``dda_merge`` combines disjoint states. Both are exact in real arithmetic and float64 sums
differ only by rounding, so the value does not depend on arrival order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dda_kernel.errors import StateError
from dda_kernel.scoring import normalise_scores
from dda_kernel.spec import CheckpointWeighting


@dataclass(frozen=True)
class DDAState:
    """``weighted_sum`` (m, n) float64 = Σ_t w_t s_t^db; ``total_weight`` = Σ_t w_t; ``checkpoints`` = ids of t."""

    weighted_sum: torch.Tensor
    total_weight: float
    checkpoints: frozenset[str]

    @property
    def n_checkpoints(self) -> int:
        """Number of checkpoints folded into the state."""
        return len(self.checkpoints)


def dda_init(n_queries: int, n_samples: int) -> DDAState:
    """An empty state for an (n_queries, n_samples) score matrix."""
    return DDAState(torch.zeros(n_queries, n_samples, dtype=torch.float64), 0.0, frozenset())


def dda_update(
    state: DDAState, checkpoint_id: str, debiased: torch.Tensor, weight: float = 1.0, standardise: bool = False
) -> DDAState:
    """Fold checkpoint t in: weighted_sum += w_t · s_t^db (z-scored per query first if ``standardise``).

    Raises :class:`StateError` if the checkpoint is already counted or the shape differs.
    """
    if checkpoint_id in state.checkpoints:
        raise StateError(f"checkpoint {checkpoint_id!r} is already in the DDA state; it must not be counted twice")
    if tuple(debiased.shape) != tuple(state.weighted_sum.shape):
        raise StateError(
            f"scores of shape {tuple(debiased.shape)} do not fit a state of shape {tuple(state.weighted_sum.shape)}"
        )
    if not weight > 0:
        raise StateError(f"checkpoint weight must be > 0, got {weight}")
    s = normalise_scores(debiased, "zscore") if standardise else debiased.to(torch.float64)
    return DDAState(state.weighted_sum + weight * s, state.total_weight + weight, state.checkpoints | {checkpoint_id})


def dda_merge(a: DDAState, b: DDAState) -> DDAState:
    """Combine states over disjoint checkpoint sets: sums and weights add."""
    overlap = a.checkpoints & b.checkpoints
    if overlap:
        raise StateError(f"cannot merge DDA states that both count checkpoints {sorted(overlap)}")
    if a.weighted_sum.shape != b.weighted_sum.shape:
        raise StateError(
            f"cannot merge states of shapes {tuple(a.weighted_sum.shape)} and {tuple(b.weighted_sum.shape)}"
        )
    return DDAState(a.weighted_sum + b.weighted_sum, a.total_weight + b.total_weight, a.checkpoints | b.checkpoints)


def dda_value(state: DDAState) -> torch.Tensor:
    """S = weighted_sum / total_weight, (m, n) float64; raises if no checkpoint was added."""
    if state.total_weight <= 0:
        raise StateError("the DDA state holds no checkpoint yet: index at least one fine-tuning checkpoint")
    return state.weighted_sum / state.total_weight


def checkpoint_weights(learning_rates: Sequence[float], kind: CheckpointWeighting = "uniform") -> list[float]:
    """w_t per checkpoint: 1 for ``uniform``; the learning rate η_t at that checkpoint for ``lr``."""
    if kind == "uniform":
        return [1.0] * len(learning_rates)
    if kind == "lr":
        if any(not lr > 0 for lr in learning_rates):
            raise ValueError(f"learning-rate weights need positive rates, got {list(learning_rates)}")
        return [float(lr) for lr in learning_rates]
    raise ValueError(f"unknown checkpoint weighting {kind!r}: choose 'uniform' or 'lr'")
