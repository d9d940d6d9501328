"""What a run read and wrote, as the governance integrations report it (OpenLineage run events): the training
datasets with their versions, the indexed model states, the Lance version of every table, and the top sources of
traced outputs. Read-only; every number comes from the store's SQL views (:mod:`storage.sql`).

A dataset's version is the one the governance report prints: md5 of the sorted content hashes of its samples
(:data:`DATASET_VERSION`), so it changes exactly when a sample is added or altered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from storage.schemas import TABLE_KEYS
from storage.sql import run
from storage.store import LineageStore

DATASET_VERSION = "md5(string_agg(content_hash, ',' ORDER BY content_hash))"


@dataclass(frozen=True)
class Provenance:
    """The store's contents at one moment: ``datasets`` (dataset, n_samples, version), ``checkpoints``
    (checkpoint_id, role, step, path, fingerprint, run_id), ``tables`` (name → Lance version) and ``root``."""

    root: str
    datasets: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    tables: dict[str, int]


def read_provenance(store: LineageStore) -> Provenance:
    """Datasets with their versions, the indexed checkpoints (base first, then by step) and table versions."""
    datasets = run(store, f"SELECT dataset, count(*) AS n_samples, {DATASET_VERSION} AS version "
                          "FROM samples GROUP BY dataset ORDER BY dataset").table.to_pylist()  # fmt: skip
    checkpoints = run(store, "SELECT checkpoint_id, role, step, path, fingerprint, run_id FROM checkpoints "
                             "ORDER BY role <> 'base', step, checkpoint_id").table.to_pylist()  # fmt: skip
    tables = {name: int(store.db.open_table(name).version) for name in TABLE_KEYS if store.has_table(name)}
    return Provenance(str(store.root), datasets, checkpoints, tables)


def top_sources(
    store: LineageStore, settings_fingerprint: str, query_ids: Sequence[str], k: int = 3
) -> dict[str, list[dict[str, Any]]]:
    """Per traced output of ``query_ids``: its ``k`` sources of largest positive-influence share (source, share,
    total_score, n_samples), from the ``source_influence`` view under ``settings_fingerprint``."""
    if not query_ids:
        return {}
    rows = run(store, """
        SELECT query_id, source, share, total_score, n_samples FROM source_influence
        WHERE list_contains($ids, query_id)
        QUALIFY row_number() OVER (PARTITION BY query_id ORDER BY share DESC NULLS LAST, source) <= $k
        ORDER BY query_id, share DESC NULLS LAST, source""", {"ids": list(query_ids), "k": k},
        settings_fingerprint=settings_fingerprint).table.to_pylist()  # fmt: skip
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r.pop("query_id"), []).append(r)
    return out
