"""Per-checkpoint scores and the running DDA state in and out of the store (numpy in, Arrow out).

Both are stored compactly: one row per (query, checkpoint) or per query, holding a float64 vector aligned
with a *sample set* (an ordered list of sample ids, stored once in ``sample_sets``). The ``scores`` and
``lineage`` SQL views unnest them into the per-sample rows of docs/store.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from storage.errors import StorageError
from storage.keys import require_unique_keys
from storage.schemas import BASE_CHECKPOINT
from storage.store import LineageStore, utcnow, where_equal, where_in


def sample_set_id(sample_ids: Sequence[str]) -> str:
    """md5 of the ids joined by newlines: the identity of an ordered sample list."""
    return hashlib.md5("\n".join(sample_ids).encode()).hexdigest()


def write_sample_set(store: LineageStore, sample_ids: Sequence[str]) -> str:
    """Store the ordered list ``sample_ids`` once (no write when it is already there); returns its id."""
    set_id = sample_set_id(sample_ids)
    if store.read("sample_sets", ["sample_set_id"], where_equal(sample_set_id=set_id)).num_rows == 0:
        row = {"sample_set_id": set_id, "sample_ids": list(sample_ids), "n_samples": len(sample_ids),
               "created_at": utcnow()}  # fmt: skip
        store.upsert("sample_sets", pa.Table.from_pylist([row]))
    return set_id


def read_sample_set(store: LineageStore, set_id: str) -> list[str]:
    """The ordered sample ids of ``set_id``; :class:`StorageError` when it is unknown."""
    table = store.read("sample_sets", ["sample_ids"], where_equal(sample_set_id=set_id))
    if table.num_rows == 0:
        raise StorageError(f"sample set {set_id} is not in the store: re-run `dda attribute` to rebuild its lineage")
    ids: list[str] = table["sample_ids"][0].as_py()
    return ids


@dataclass(frozen=True)
class ScoreBlock:
    """s̃_t of ``query_ids`` at one checkpoint: ``scores`` (m, n) aligned with a sample set; w_t = ``weight``."""

    checkpoint_id: str
    query_ids: list[str]
    scores: np.ndarray
    weight: float


def write_scores(
    store: LineageStore, settings_fingerprint: str, set_id: str, blocks: Sequence[ScoreBlock], debias_coefficient: float
) -> int:
    """Upsert one row per (query, checkpoint) of ``blocks`` in one commit; returns rows inserted (not updated).

    The base model's block (checkpoint ``'base'``) holds s̃_0; the ``scores`` view joins it to every
    checkpoint's row and derives s_t^db = s̃_t − λ s̃_0 with λ = ``debias_coefficient``.
    """
    rows = []
    now = utcnow()
    for b in blocks:
        if b.scores.ndim != 2 or b.scores.shape[0] != len(b.query_ids):
            raise ValueError(f"scores of shape {b.scores.shape} do not fit {len(b.query_ids)} queries")
        weight = 0.0 if b.checkpoint_id == BASE_CHECKPOINT else b.weight
        for q, vector in zip(b.query_ids, b.scores, strict=True):
            rows.append((q, b.checkpoint_id, vector, weight))
    if not rows:
        return 0
    data = pa.table({
        "query_id": [r[0] for r in rows], "checkpoint_id": [r[1] for r in rows],
        "settings_fingerprint": [settings_fingerprint] * len(rows), "sample_set_id": [set_id] * len(rows),
        "score": _vectors([r[2] for r in rows]), "weight": [r[3] for r in rows],
        "debias_coefficient": [float(debias_coefficient)] * len(rows), "written_at": [now] * len(rows),
    })  # fmt: skip
    return store.upsert("scores", data)


def _vectors(vectors: Sequence[np.ndarray]) -> pa.ListArray:
    """float64 vectors as one Arrow list column (one flat buffer, no per-value Python objects)."""
    lengths = np.array([len(v) for v in vectors], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([np.asarray(v, dtype=np.float64) for v in vectors]) if vectors else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def read_base_scores(
    store: LineageStore, settings_fingerprint: str, set_id: str, query_ids: Sequence[str]
) -> dict[str, np.ndarray]:
    """The stored s̃_0 vectors of those ``query_ids`` that have one over sample set ``set_id``."""
    where = f"{where_equal(settings_fingerprint=settings_fingerprint, checkpoint_id=BASE_CHECKPOINT, sample_set_id=set_id)} AND {where_in('query_id', list(query_ids))}"  # noqa: E501
    table = store.read("scores", ["query_id", "score"], where)
    require_unique_keys("scores", table["query_id"].to_pylist(), "at the base model")
    return dict(zip(table["query_id"].to_pylist(), _rows_of(table["score"]), strict=True))


def _rows_of(column: pa.ChunkedArray) -> list[np.ndarray]:
    """The float64 vectors of a list column, as numpy rows."""
    out = []
    for chunk in column.chunks:
        flat = chunk.flatten().to_numpy(zero_copy_only=False)
        offsets = chunk.offsets.to_numpy()
        out += [flat[offsets[i] - offsets[0] : offsets[i + 1] - offsets[0]] for i in range(len(chunk))]
    return out


@dataclass(frozen=True)
class StoredState:
    """The running DDA state of some queries as stored: sums (m, n) aligned with ``sample_ids``."""

    query_ids: list[str]
    sample_ids: list[str]
    weighted_sum: np.ndarray
    total_weight: np.ndarray
    checkpoints: list[frozenset[str]]


def write_dda_state(store: LineageStore, settings_fingerprint: str, state: StoredState) -> int:
    """Upsert the running state of every query of ``state`` (one row each, one commit)."""
    set_id = write_sample_set(store, state.sample_ids)
    m = len(state.query_ids)
    if state.weighted_sum.shape != (m, len(state.sample_ids)):
        raise ValueError(f"state sums of shape {state.weighted_sum.shape} do not fit {m} queries")
    data = pa.table({
        "query_id": list(state.query_ids), "settings_fingerprint": [settings_fingerprint] * m,
        "sample_set_id": [set_id] * m, "weighted_sum": _vectors(list(state.weighted_sum)),
        "total_weight": state.total_weight.astype(np.float64), "checkpoints": [sorted(c) for c in state.checkpoints],
        "updated_at": [utcnow()] * m,
    })  # fmt: skip
    return store.upsert("dda_state", data)


def read_dda_states(store: LineageStore, settings_fingerprint: str, query_ids: Sequence[str]) -> dict[str, StoredState]:
    """The stored state of each of ``query_ids`` that has one (one read), keyed by query id."""
    where = f"{where_equal(settings_fingerprint=settings_fingerprint)} AND {where_in('query_id', list(query_ids))}"
    table = store.read("dda_state", ["query_id", "sample_set_id", "weighted_sum", "total_weight", "checkpoints"], where)
    ids = table["query_id"].to_pylist()
    for q in ids:
        if ids.count(q) > 1:
            require_unique_keys("dda_state", ids, f"of query {q}")
    sets: dict[str, list[str]] = {}
    out = {}
    for q, set_id, sums, total, ckpts in zip(
        ids, table["sample_set_id"].to_pylist(), _rows_of(table["weighted_sum"]), table["total_weight"].to_pylist(),
        table["checkpoints"].to_pylist(), strict=True,
    ):  # fmt: skip
        if set_id not in sets:
            sets[set_id] = read_sample_set(store, set_id)
        out[q] = StoredState([q], sets[set_id], sums[None, :], np.array([total]), [frozenset(ckpts)])
    return out


def read_dda_state(store: LineageStore, settings_fingerprint: str, query_id: str) -> StoredState | None:
    """The stored state of one query, or None when it has none yet."""
    return read_dda_states(store, settings_fingerprint, [query_id]).get(query_id)
