"""Gradient embeddings in and out of the store: float16 sample vectors, float32 query vectors (numpy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from storage.errors import FingerprintMismatchError
from storage.keys import require_unique_keys
from storage.store import LineageStore, where_equal, where_in


def _vector_column(vectors: np.ndarray, dtype: type) -> pa.FixedSizeListArray:
    flat: np.ndarray = np.ascontiguousarray(vectors, dtype=dtype).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), vectors.shape[1])


def _check(store: LineageStore, vectors: np.ndarray, n: int) -> str:
    meta = store.meta
    if meta is None or vectors.ndim != 2 or vectors.shape[1] != meta.dim:
        raise FingerprintMismatchError(
            f"vectors of shape {vectors.shape} do not fit store {store.root} "
            f"(projection {meta.projection_fingerprint if meta else 'none'}, dim {meta.dim if meta else 'none'})"
        )
    if vectors.shape[0] != n:
        raise ValueError(f"{vectors.shape[0]} vectors for {n} ids")
    return meta.projection_fingerprint


FLOAT16_MAX = float(np.finfo(np.float16).max)


def _check_float16_range(vectors: np.ndarray, ids: Sequence[str]) -> None:
    """Refuse vectors float16 cannot hold (|v| > 65 504 would be stored as infinity), naming the first sample."""
    big = np.abs(vectors).max(axis=1) > FLOAT16_MAX if len(vectors) else np.zeros(0, dtype=bool)
    bad = ~np.isfinite(vectors).all(axis=1) | big
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"the gradient embedding of {ids[i]!r} has a value beyond the float16 range the store keeps "
            f"(max |v| = {float(np.abs(vectors[i]).max()):.4g} > {FLOAT16_MAX:g}, or not finite): "
            "use DDA_PROJECTION__LOSS_REDUCTION=mean or check the sample for a diverging loss"
        )


def _at_checkpoint(store: LineageStore, checkpoint_id: str, **more: str) -> str:
    """Filter for rows of ``checkpoint_id`` at this store's projection fingerprint (and ``more`` columns)."""
    fp = store.meta.projection_fingerprint if store.meta else ""
    return where_equal(checkpoint_id=checkpoint_id, projection_fingerprint=fp, **more)


def write_embeddings(
    store: LineageStore,
    checkpoint_id: str,
    sample_ids: Sequence[str],
    vectors: np.ndarray,
    loss: np.ndarray,
    n_tokens: np.ndarray,
) -> int:
    """Upsert ĝ_i(θ_t) for ``sample_ids`` (vectors (n, D), stored float16) with loss and ‖ĝ_i‖ (from float32)."""
    fp = _check(store, vectors, len(sample_ids))
    _check_float16_range(vectors, sample_ids)
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    data = pa.table({
        "sample_id": list(sample_ids), "checkpoint_id": [checkpoint_id] * len(sample_ids),
        "projection_fingerprint": [fp] * len(sample_ids), "vector": _vector_column(vectors, np.float16),
        "loss": np.asarray(loss, dtype=np.float64), "grad_norm": norms,
        "n_tokens": np.asarray(n_tokens, dtype=np.int64),
    })  # fmt: skip
    return store.upsert("embeddings", data)


@dataclass(frozen=True)
class EmbeddingMatrix:
    """One checkpoint's stored vectors in storage order (no row reordering: 100k × D floats are large).

    ``vectors`` (n, D) float16 and ``grad_norms`` (n,) follow ``sample_ids``; ``order`` sorts them by id,
    so scores computed in storage order are aligned across checkpoints with ``scores[:, order]``.
    """

    sample_ids: np.ndarray
    vectors: np.ndarray
    grad_norms: np.ndarray

    @property
    def order(self) -> np.ndarray:
        """Permutation that sorts rows by sample id."""
        perm: np.ndarray = np.argsort(self.sample_ids, kind="stable")
        return perm


def read_embeddings(store: LineageStore, checkpoint_id: str, as_of: int | str | None = None) -> EmbeddingMatrix:
    """The vectors of one checkpoint at this store's projection, as stored (see :class:`EmbeddingMatrix`)."""
    table = store.read("embeddings", ["sample_id", "vector", "grad_norm"], _at_checkpoint(store, checkpoint_id), as_of)
    ids = table["sample_id"].to_numpy(zero_copy_only=False).astype(str)
    require_unique_keys("embeddings", ids, f"at checkpoint {checkpoint_id}")
    flat = table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    dim = store.meta.dim if store.meta else 0
    return EmbeddingMatrix(ids, flat.reshape(len(ids), dim), table["grad_norm"].to_numpy())


def embedded_sample_ids(store: LineageStore, checkpoint_id: str) -> set[str]:
    """Ids of samples already embedded at ``checkpoint_id`` (for resuming an interrupted run)."""
    where = _at_checkpoint(store, checkpoint_id)
    return set(store.read("embeddings", ["sample_id"], where)["sample_id"].to_pylist())


def write_query_embeddings(
    store: LineageStore, checkpoint_id: str, kind: str, query_ids: Sequence[str], vectors: np.ndarray
) -> int:
    """Upsert ĝ_q(θ_t) (float32) of ``kind`` 'plain' or 'contrastive' for ``query_ids``."""
    fp = _check(store, vectors, len(query_ids))
    n = len(query_ids)
    data = pa.table({
        "query_id": list(query_ids), "checkpoint_id": [checkpoint_id] * n, "projection_fingerprint": [fp] * n,
        "kind": [kind] * n, "vector": _vector_column(vectors, np.float32),
        "grad_norm": np.linalg.norm(vectors.astype(np.float64), axis=1),
    })  # fmt: skip
    return store.upsert("query_embeddings", data)


def read_query_embeddings(store: LineageStore, checkpoint_id: str, kind: str, query_ids: Sequence[str]) -> np.ndarray:
    """Query vectors (m, D) float32 in the order of ``query_ids``; raises KeyError naming a missing one.

    Reads by key (a filter on the ids asked), never every stored vector of the kind."""
    where = f"{_at_checkpoint(store, checkpoint_id, kind=kind)} AND {where_in('query_id', list(query_ids))}"
    table = store.read("query_embeddings", ["query_id", "vector"], where)
    require_unique_keys("query_embeddings", table["query_id"].to_pylist(), f"at checkpoint {checkpoint_id} ({kind})")
    index = {q: i for i, q in enumerate(table["query_id"].to_pylist())}
    missing = [q for q in query_ids if q not in index]
    if missing:
        raise KeyError(f"query {missing[0]!r} has no {kind} embedding at checkpoint {checkpoint_id!r}")
    flat = table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    matrix = flat.reshape(table.num_rows, -1)
    selected: np.ndarray = matrix[[index[q] for q in query_ids]]
    return selected


def count_embeddings(store: LineageStore, checkpoint_id: str) -> int:
    """Number of sample vectors stored for ``checkpoint_id`` at this store's projection."""
    if not store.has_table("embeddings"):
        return 0
    return int(store.db.open_table("embeddings").count_rows(_at_checkpoint(store, checkpoint_id)))
