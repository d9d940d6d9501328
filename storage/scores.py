"""Per-checkpoint scores and the running DDA state in and out of the store (numpy in, Arrow out)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from storage.doctor import check_unique
from storage.store import LineageStore, utcnow, where_equal


def write_scores(
    store: LineageStore,
    settings_fingerprint: str,
    checkpoint_id: str,
    query_ids: Sequence[str],
    sample_ids: Sequence[str],
    score: np.ndarray,
    base_score: np.ndarray,
    debiased: np.ndarray,
    weight: float,
) -> int:
    """Upsert s̃_t, s̃_0 and s_t^db for every (query, sample) at one checkpoint; matrices (m, n)."""
    m, n = len(query_ids), len(sample_ids)
    for name, value in (("score", score), ("base_score", base_score), ("debiased", debiased)):
        if value.shape != (m, n):
            raise ValueError(f"{name} has shape {value.shape}, expected ({m}, {n}) for the given ids")
    data = pa.table({
        "query_id": np.repeat(np.asarray(query_ids, dtype=object), n),
        "sample_id": np.tile(np.asarray(sample_ids, dtype=object), m),
        "checkpoint_id": [checkpoint_id] * (m * n), "settings_fingerprint": [settings_fingerprint] * (m * n),
        "score": score.reshape(-1).astype(np.float64), "base_score": base_score.reshape(-1).astype(np.float64),
        "debiased_score": debiased.reshape(-1).astype(np.float64), "weight": np.full(m * n, weight),
        "written_at": [utcnow()] * (m * n),
    })  # fmt: skip
    return store.upsert("scores", data)


@dataclass(frozen=True)
class StoredState:
    """The running DDA state of some queries as stored: sums (m, n) aligned with ``sample_ids``."""

    query_ids: list[str]
    sample_ids: list[str]
    weighted_sum: np.ndarray
    total_weight: np.ndarray
    checkpoints: list[frozenset[str]]


def write_dda_state(store: LineageStore, settings_fingerprint: str, state: StoredState) -> int:
    """Upsert the running state of every (query, sample); replaces the earlier state of those keys."""
    m, n = len(state.query_ids), len(state.sample_ids)
    now = utcnow()
    data = pa.table({
        "query_id": np.repeat(np.asarray(state.query_ids, dtype=object), n),
        "sample_id": np.tile(np.asarray(state.sample_ids, dtype=object), m),
        "settings_fingerprint": [settings_fingerprint] * (m * n),
        "weighted_sum": state.weighted_sum.reshape(-1).astype(np.float64),
        "total_weight": np.repeat(state.total_weight.astype(np.float64), n),
        "checkpoints": [sorted(c) for c in state.checkpoints for _ in range(n)],
        "updated_at": [now] * (m * n),
    })  # fmt: skip
    return store.upsert("dda_state", data)


def read_dda_state(store: LineageStore, settings_fingerprint: str, query_id: str) -> StoredState | None:
    """The stored state of one query (samples sorted by id), or None when it has none yet."""
    where = where_equal(settings_fingerprint=settings_fingerprint, query_id=query_id)
    table = store.read("dda_state", ["sample_id", "weighted_sum", "total_weight", "checkpoints"], where)
    if table.num_rows == 0:
        return None
    table = table.sort_by("sample_id")
    check_unique("dda_state", table["sample_id"].to_pylist(), f"of query {query_id}")
    total = table["total_weight"].to_numpy()
    return StoredState(
        [query_id],
        table["sample_id"].to_pylist(),
        table["weighted_sum"].to_numpy()[None, :],
        total[:1],
        [frozenset(table["checkpoints"][0].as_py())],
    )
