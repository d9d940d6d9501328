"""Attribute outputs end to end as plain functions: register queries, embed them, fold their lineage.

The ``dda-attribute`` flow runs :func:`attribute_queries` as a task; ``dda attribute`` calls it directly when
no Prefect server is configured (README: when a temporary server is worth its cost). No Prefect here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from storage.samples import QueryIn, extra_fields, group_id, read_rows, register_groups, register_queries
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
    config: PipelineConfig, group: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Register the queries of ``queries_file`` (checked against the context length first) and ``query_ids``,
    then compute or refresh their lineage; returns what was done (queries, folds, query_ids, groups,
    extra_fields).

    Rows with a ``group`` field, and with ``group`` every row of the file without one, also form query groups
    (:func:`storage.samples.register_groups`) traced with their members.
    """
    ids = list(query_ids)
    extra: list[str] = []
    groups: dict[str, list[str]] = {}
    if queries_file is not None:
        rows = read_rows(queries_file, QueryIn)
        names = [f"query {q.id!r}" if q.id else f"query on row {i + 1}" for i, q in enumerate(rows)]
        texts = [(n, q.prompt, t) for n, q in zip(names, rows, strict=True) for t in (q.response, q.corrected) if t]
        check_lengths(base_reference, texts, config)
        store = LineageStore.open(Path(data_dir) / "store")
        registered = register_queries(store, rows)
        ids += registered
        for row, qid in zip(rows, registered, strict=True):
            if row.group or group:
                groups.setdefault(row.group or str(group), []).append(qid)
        ids += register_groups(store, groups)
        extra = extra_fields(rows)
    elif group is not None:
        raise ValueError("--group names the group of a queries file's rows: give a queries file")
    chosen = sorted(set(ids))
    report = refresh_queries(data_dir, base_reference, chosen, config)
    return {**report, "query_ids": chosen, "groups": sorted(group_id(g) for g in groups), "extra_fields": extra}
