"""Attribute outputs end to end as plain functions: register queries, embed them, fold their lineage.

The ``dda-attribute`` flow runs :func:`attribute_queries` as a task; ``dda attribute`` calls it directly when
no Prefect server is configured (README: when a temporary server is worth its cost). No Prefect here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from storage.samples import QueryIn, extra_fields, read_rows, register_queries
from storage.store import LineageStore
from tasks.config import PipelineConfig
from tasks.indexing import check_lengths, embed_queries, indexed_checkpoints
from tasks.lineage import refresh_lineage

QUERY_BATCH = 128  # queries scored together: each batch reads every checkpoint's matrix once


def refresh_queries(
    data_dir: str | Path, base_reference: str, query_ids: Sequence[str] | None, config: PipelineConfig
) -> dict[str, int]:
    """Embed ``query_ids`` (None: every registered query) at every indexed checkpoint where they are not yet
    embedded, then fold the missing checkpoints into their DDA states, :data:`QUERY_BATCH` queries at a time."""
    store = LineageStore.open(Path(data_dir) / "store")
    ids = (
        list(query_ids)
        if query_ids is not None
        else sorted(store.read("queries", ["query_id"])["query_id"].to_pylist())
    )
    if not ids:
        return {"queries": 0, "folds": 0}
    for checkpoint in indexed_checkpoints(data_dir):
        embed_queries(data_dir, base_reference, checkpoint, ids, config)
    batches = [ids[i : i + QUERY_BATCH] for i in range(0, len(ids), QUERY_BATCH)]
    folds = sum(refresh_lineage(data_dir, base_reference, batch, config) for batch in batches)
    return {"queries": len(ids), "folds": folds}


def attribute_queries(
    data_dir: str | Path, base_reference: str, queries_file: str | None, query_ids: Sequence[str],
    config: PipelineConfig,
) -> dict[str, Any]:  # fmt: skip
    """Register the queries of ``queries_file`` (checked against the context length first) and ``query_ids``,
    then compute or refresh their lineage; returns what was done (queries, folds, query_ids, extra_fields)."""
    ids = list(query_ids)
    extra: list[str] = []
    if queries_file is not None:
        rows = read_rows(queries_file, QueryIn)
        names = [f"query {q.id!r}" if q.id else f"query on row {i + 1}" for i, q in enumerate(rows)]
        texts = [(n, q.prompt, t) for n, q in zip(names, rows, strict=True) for t in (q.response, q.corrected) if t]
        check_lengths(base_reference, texts, config)
        ids += register_queries(LineageStore.open(Path(data_dir) / "store"), rows)
        extra = extra_fields(rows)
    chosen = sorted(set(ids))
    return {**refresh_queries(data_dir, base_reference, chosen, config), "query_ids": chosen, "extra_fields": extra}
