"""Small builders shared by the storage tests (real LanceDB and DuckDB under a temporary folder)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from storage.samples import QueryIn, SampleIn, ingest_samples, register_queries
from storage.scores import ScoreBlock, StoredState, write_dda_state, write_sample_set, write_scores
from storage.store import LineageStore, utcnow

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


SETTINGS = "settings-a"
N = 12
SAMPLES = [f"s{i:03d}" for i in range(N)]
SOURCES = {f"s{i:03d}": ("news", "forum", "wiki")[i % 3] for i in range(N)}
CHECKPOINTS = [("base", 0), ("c1", 10), ("c2", 20), ("c3", 30)]


def lineage_world(tmp_path):
    """A store with 12 samples, 2 queries, base + 3 checkpoints of scores and the running state.

    Returns (store, S = the DDA scores (2 × 12), the debiased scores per checkpoint, the checkpoint weights,
    s̃_0 (2 × 12)); at a checkpoint, s̃_t = debiased + s̃_0.
    """
    store = seeded_store(tmp_path, n=N)
    queries = register_queries(
        store, [QueryIn(id="q1", prompt="p", response="r"), QueryIn(id="q2", prompt="p", response="s")]
    )
    rows = [
        {"checkpoint_id": c, "run_id": "run", "role": "base" if c == "base" else "finetuned", "step": step,
         "epoch": step / 10, "learning_rate": 1e-4, "path": f"/x/{c}", "fingerprint": f"fp-{c}",
         "projection_fingerprint": "p", "indexed_at": utcnow()}
        for c, step in CHECKPOINTS
    ]  # fmt: skip
    store.upsert("checkpoints", pa.Table.from_pylist(rows))
    rng = np.random.default_rng(0)
    base = rng.standard_normal((2, N))
    weights = {"c1": 1.0, "c2": 2.0, "c3": 0.5}
    debiased = {}
    blocks = [ScoreBlock("base", queries, base, 0.0)]
    for c, w in weights.items():
        s = rng.standard_normal((2, N))
        debiased[c] = s - base
        blocks.append(ScoreBlock(c, queries, s, w))
    write_scores(store, SETTINGS, write_sample_set(store, SAMPLES), blocks, debias_coefficient=1.0)
    total = sum(weights.values())
    weighted = sum(w * debiased[c] for c, w in weights.items())
    state = StoredState(queries, SAMPLES, weighted, np.full(2, total), [frozenset(weights)] * 2)
    write_dda_state(store, SETTINGS, state)
    return store, weighted / total, debiased, weights, base
