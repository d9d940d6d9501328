"""Small builders shared by the storage tests (real LanceDB and DuckDB under a temporary folder)."""

from __future__ import annotations

import numpy as np

from storage.samples import SampleIn, ingest_samples
from storage.store import LineageStore

DIM = 16
FP = "proj-test-0001"


def open_store(root) -> LineageStore:
    return LineageStore.open(root, projection_fingerprint=FP, dim=DIM)


def sample_rows(n: int, sources=("news", "forum", "wiki"), licenses=("cc-by", "proprietary")) -> list[SampleIn]:
    return [
        SampleIn(
            id=f"s{i:03d}",
            prompt=f"document {i}",
            response=f"summary {i}",
            source=sources[i % len(sources)],
            license=licenses[i % len(licenses)],
        )
        for i in range(n)
    ]


def seeded_store(root, n: int = 12) -> LineageStore:
    store = open_store(root)
    ingest_samples(store, sample_rows(n), dataset="toy")
    return store


def random_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
