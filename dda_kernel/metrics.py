"""Ranking metrics for attribution quality: ROC-AUC and average precision of a score vector."""

from __future__ import annotations

import torch


def roc_auc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counted ½ (Mann–Whitney U).

    scores: (n,) any float dtype; positives: (n,) bool. Needs at least one positive and one negative.
    """
    s = scores.to(torch.float64).flatten()
    pos = positives.flatten().bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs positives and negatives, got {n_pos} and {n_neg}")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    for value in torch.unique(s[order][1:][s[order][1:] == s[order][:-1]]):
        tied = s == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """AP = mean over positives of the precision at that positive's rank (descending scores)."""
    order = torch.argsort(scores.to(torch.float64).flatten(), descending=True, stable=True)
    hits = positives.flatten().bool()[order].to(torch.float64)
    if hits.sum() == 0:
        raise ValueError("average precision needs at least one positive")
    precision = hits.cumsum(0) / torch.arange(1, hits.numel() + 1, dtype=torch.float64)
    return float((precision * hits).sum() / hits.sum())
