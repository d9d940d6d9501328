"""BM25 (Okapi) over the training text: the lexical baseline of the hallucination benchmark.

score(q, d) = Σ_{t ∈ q} idf(t) · f(t, d) (k1 + 1) / (f(t, d) + k1 (1 − b + b |d| / avgdl)),
idf(t) = ln(1 + (N − n(t) + 0.5) / (n(t) + 0.5)), tokens = lower-cased word characters.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

TOKEN = re.compile(r"\w+")


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return TOKEN.findall(text.lower())


class BM25:
    """An index of documents; :meth:`scores` gives the BM25 score of a query against every document."""

    def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.counts = [Counter(tokens(d)) for d in documents]
        self.lengths = np.array([sum(c.values()) for c in self.counts], dtype=np.float64)
        self.avgdl = float(self.lengths.mean()) if len(documents) else 0.0
        df: Counter[str] = Counter()
        for c in self.counts:
            df.update(c.keys())
        n = len(documents)
        self.idf = {t: math.log(1 + (n - k + 0.5) / (k + 0.5)) for t, k in df.items()}

    def scores(self, query: str) -> np.ndarray:
        """BM25 of ``query`` against every document, shape (n_documents,)."""
        norm = self.k1 * (1 - self.b + self.b * self.lengths / max(self.avgdl, 1e-12))
        out = np.zeros(len(self.counts))
        for term in set(tokens(query)):
            idf = self.idf.get(term)
            if idf is None:
                continue
            f = np.array([c.get(term, 0) for c in self.counts], dtype=np.float64)
            out += idf * f * (self.k1 + 1) / (f + norm)
        return out
