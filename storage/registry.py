"""The registry tables: indexed checkpoints, the flow runs that wrote the store and the corrections the
counterfactual query derived (the audit trail)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from storage.keys import require_unique_keys
from storage.store import LineageStore, utcnow, where_equal, where_in


def write_checkpoint(store: LineageStore, row: Mapping[str, Any]) -> None:
    """Upsert one ``checkpoints`` row (fields of :class:`storage.schemas.CheckpointRow`)."""
    store.upsert("checkpoints", pa.Table.from_pylist([dict(row)]))


def read_checkpoints(store: LineageStore) -> list[dict[str, Any]]:
    """Every indexed checkpoint: the base model first, then fine-tuning checkpoints by step."""
    rows: list[dict[str, Any]] = store.read("checkpoints").to_pylist()
    require_unique_keys("checkpoints", [r["checkpoint_id"] for r in rows])
    return sorted(rows, key=lambda r: (r["role"] != "base", r["step"], r["checkpoint_id"]))


def write_run(store: LineageStore, row: Mapping[str, Any]) -> None:
    """Upsert one ``runs`` row (fields of :class:`storage.schemas.RunRow`)."""
    store.upsert("runs", pa.Table.from_pylist([dict(row)]))


def write_derived_corrections(store: LineageStore, checkpoint_id: str, rows: Sequence[Mapping[str, Any]]) -> int:
    """Upsert the derived corrections at ``checkpoint_id``: each row has the fields of
    :class:`storage.schemas.DerivedCorrectionRow` but ``checkpoint_id`` and ``derived_at``; returns rows inserted."""
    now = utcnow()
    data = [{**dict(r), "checkpoint_id": checkpoint_id, "derived_at": now} for r in rows]
    return store.upsert("derived_corrections", pa.Table.from_pylist(data)) if data else 0


def read_derived_corrections(
    store: LineageStore, checkpoint_id: str, query_ids: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """{query_id: its ``derived_corrections`` row at ``checkpoint_id``} for the ``query_ids`` that have one."""
    if not query_ids or not store.has_table("derived_corrections"):
        return {}
    where = f"{where_equal(checkpoint_id=checkpoint_id)} AND {where_in('query_id', list(query_ids))}"
    rows = store.read("derived_corrections", where=where).to_pylist()
    require_unique_keys("derived_corrections", [r["query_id"] for r in rows])
    return {r["query_id"]: r for r in rows}


def write_trace_failures(store: LineageStore, failures: Mapping[str, tuple[str | None, str, str]]) -> None:
    """Record {query_id: (checkpoint_id or None, stage, error)} as the outputs' last attempt: failed."""
    now = utcnow()
    rows = [{"query_id": q, "status": "failed", "checkpoint_id": c, "stage": stage, "error": error, "updated_at": now}
            for q, (c, stage, error) in sorted(failures.items())]  # fmt: skip
    if rows:
        store.upsert("trace_status", pa.Table.from_pylist(rows))


def clear_trace_failures(store: LineageStore, query_ids: Sequence[str]) -> list[str]:
    """Mark those of ``query_ids`` recorded as failed as traced now (``ok``); returns them. Reads by key."""
    if not query_ids or not store.has_table("trace_status"):
        return []
    where = f"{where_in('query_id', list(query_ids))} AND status = 'failed'"
    failed = store.read("trace_status", ["query_id"], where)["query_id"].to_pylist()
    now = utcnow()
    rows = [{"query_id": q, "status": "ok", "checkpoint_id": None, "stage": None, "error": None, "updated_at": now}
            for q in sorted(failed)]  # fmt: skip
    if rows:
        store.upsert("trace_status", pa.Table.from_pylist(rows, schema=store.table("trace_status").schema))
    return sorted(failed)
