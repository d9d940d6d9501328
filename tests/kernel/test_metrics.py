"""ROC-AUC and AP against brute-force definitions."""

from __future__ import annotations

import torch

from dda_kernel.metrics import average_precision, roc_auc


def test_roc_auc_equals_pairwise_count_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (80,), generator=gen).double()
    labels = torch.rand(80, generator=gen) < 0.3
    pos, neg = scores[labels], scores[~labels]
    brute = sum(float(p > q) + 0.5 * float(p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert abs(roc_auc(scores, labels) - brute) < 1e-12
    assert roc_auc(labels.double(), labels) == 1.0


def test_average_precision_matches_definition():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([True, False, True, False, True])
    assert abs(average_precision(scores, labels) - (1 / 1 + 2 / 3 + 3 / 5) / 3) < 1e-12
