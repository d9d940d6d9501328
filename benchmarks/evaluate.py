"""Scoring a ranking against the canary ground truth, per pair, and choosing settings leave-one-pair-out.

A *ranking* of one canary pair is a score matrix (m, n): one row per traced output of that pair (or a
single row for methods that score the pair's outputs jointly, like CEA), one column per training
sample. The positives of a pair are its corrupted training samples; every other sample (clean X
documents, Y distractors, other pairs' corrupted samples, unrelated documents) is a negative.
Per-pair metrics are means over the pair's rows; a method's mean is the mean over pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dda_kernel.metrics import average_precision, roc_auc


@dataclass(frozen=True)
class PairMetrics:
    """ROC-AUC, average precision, recall@R (R = number of positives), recall@10 and the reciprocal rank of the
    first positive (MRR once averaged) of one pair, averaged over rows."""

    auc: float
    ap: float
    recall_at_r: float
    recall_at_10: float = float("nan")
    mrr: float = float("nan")
    row_aucs: tuple[float, ...] = ()  # one per row (traced output), for intervals over outputs


def recall_at_k(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    """Share of the positives among the ``k`` highest scores (ties broken by sample order)."""
    top = np.argsort(-scores, kind="stable")[:k]
    return float(positives[top].sum() / positives.sum())


def pair_metrics(scores: np.ndarray, positives: np.ndarray) -> PairMetrics:
    """Metrics of a (m, n) score matrix against a (n,) boolean ground truth, means over the m rows."""
    rows = np.atleast_2d(scores)
    pos = torch.from_numpy(positives.astype(bool))
    r = int(positives.sum())
    aucs = [roc_auc(torch.from_numpy(row), pos) for row in rows]
    aps = [average_precision(torch.from_numpy(row), pos) for row in rows]
    recalls = [recall_at_k(row, positives, r) for row in rows]
    at_10 = [recall_at_k(row, positives, 10) for row in rows]
    mrr = [reciprocal_rank(row, positives) for row in rows]
    return PairMetrics(*(float(np.mean(x)) for x in (aucs, aps, recalls, at_10, mrr)), row_aucs=tuple(aucs))


def bootstrap_ci(
    metrics: Mapping[str, PairMetrics], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean AUC over outputs: each resample draws every pair's outputs with
    replacement (as many as it has), then takes the mean over pairs of the per-pair mean, the estimator the
    tables report. None when a pair has no per-output AUCs."""
    rows = [np.asarray(m.row_aucs, dtype=np.float64) for m in metrics.values()]
    if not rows or any(r.size == 0 for r in rows):
        return None
    rng = np.random.default_rng(seed)
    means = np.mean([r[rng.integers(0, r.size, size=(n_boot, r.size))].mean(axis=1) for r in rows], axis=0)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def reciprocal_rank(scores: np.ndarray, positives: np.ndarray) -> float:
    """1 / rank of the highest-scored positive (ranks from 1, ties broken by sample order)."""
    order = np.argsort(-scores, kind="stable")
    return float(1.0 / (1 + int(np.flatnonzero(positives[order])[0])))


def evaluate(rankings: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray]) -> dict[str, PairMetrics]:
    """Per-pair metrics of ``rankings`` (pair → (m, n) scores) against ``truth`` (pair → (n,) positives)."""
    return {pair: pair_metrics(rankings[pair], truth[pair]) for pair in rankings}


def mean_of(metrics: Mapping[str, PairMetrics], field: str = "auc") -> float:
    """Mean of one metric over pairs."""
    return float(np.mean([getattr(m, field) for m in metrics.values()]))


@dataclass(frozen=True)
class Selected:
    """The outcome of leave-one-pair-out selection: each pair scored with the candidate chosen on the others."""

    metrics: dict[str, PairMetrics]
    chosen: dict[str, str]


def leave_one_pair_out(candidates: Mapping[str, Mapping[str, PairMetrics]], pairs: Sequence[str]) -> Selected:
    """For each pair p: the candidate with the best mean AUC over the *other* pairs, scored on p.

    ``candidates`` maps a setting's name to its per-pair metrics. Ties go to the first candidate in
    insertion order, so list the simplest settings first. With one pair, the choice uses that pair
    (there is nothing else to validate on) — reported as such by the caller.
    """
    metrics: dict[str, PairMetrics] = {}
    chosen: dict[str, str] = {}
    for p in pairs:
        others = [q for q in pairs if q != p] or [p]
        best = max(candidates, key=lambda c: np.mean([candidates[c][q].auc for q in others]))
        chosen[p], metrics[p] = best, candidates[best][p]
    return Selected(metrics, chosen)
