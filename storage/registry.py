"""The registry tables: indexed checkpoints and the flow runs that wrote the store (the audit trail)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from storage.doctor import check_unique
from storage.store import LineageStore


def write_checkpoint(store: LineageStore, row: Mapping[str, Any]) -> None:
    """Upsert one ``checkpoints`` row (fields of :class:`storage.schemas.CheckpointRow`)."""
    store.upsert("checkpoints", pa.Table.from_pylist([dict(row)]))


def read_checkpoints(store: LineageStore) -> list[dict[str, Any]]:
    """Every indexed checkpoint: the base model first, then fine-tuning checkpoints by step."""
    rows: list[dict[str, Any]] = store.read("checkpoints").to_pylist()
    check_unique("checkpoints", [r["checkpoint_id"] for r in rows])
    return sorted(rows, key=lambda r: (r["role"] != "base", r["step"], r["checkpoint_id"]))


def write_run(store: LineageStore, row: Mapping[str, Any]) -> None:
    """Upsert one ``runs`` row (fields of :class:`storage.schemas.RunRow`)."""
    store.upsert("runs", pa.Table.from_pylist([dict(row)]))
