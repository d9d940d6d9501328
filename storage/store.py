"""The versioned lineage store: LanceDB tables under one data folder, written by idempotent upserts.

Layout: ``<root>/store.json`` (schema version, projection fingerprint, dimension) and
``<root>/lance/<table>.lance``. Lance commits are atomic, so a process killed mid-write leaves the
previous version readable; every write is a ``merge_insert`` on the table's natural key, so re-running
it completes the work without duplicates.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import lancedb
import pyarrow as pa
from filelock import FileLock
from lancedb.index import Bitmap

from storage.errors import FingerprintMismatchError, StorageError
from storage.schemas import SCHEMA_VERSION, TABLE_KEYS, table_schema

_CREATE_GUARD = threading.Lock()
CREATE_LOCK_FILE = ".tables.lock"  # under <root>: the guard across processes (Dask workers of one flow run)
# Scalar indexes on the columns every read of a table filters by (built by LineageStore.compact).
# Tables of long float64 vectors use Lance file format 2.0: measured writing 64 × 100 000 float64 lists,
# 2.0 took 0.06 s and the default 2.1 0.57 s (its list encoding), reads 0.08 s vs 0.17 s.
FILE_VERSION: dict[str, str] = {"scores": "2.0", "dda_state": "2.0", "sample_sets": "2.0"}
FRAGMENT_ROWS = 65536  # compaction target: full fragments are never rewritten
RETENTION = timedelta(hours=1)  # versions younger than this are kept for readers on an old snapshot
SCALAR_INDEXES: dict[str, tuple[str, ...]] = {"embeddings": ("checkpoint_id",), "query_embeddings": ("checkpoint_id",)}


def utcnow() -> datetime:
    """Naive UTC timestamp (the stores' timestamp columns are UTC without a zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class StoreMeta:
    """What every vector in the store depends on; fixed at creation.

    ``layout`` lists the tracked modules as the projection lays them out (name, d_in, d_out, k_in, k_out,
    offset), so that scoring rebuilds the layout without loading a model.
    """

    schema_version: int
    projection_fingerprint: str
    dim: int
    created_at: str
    layout: list[dict[str, Any]] = field(default_factory=list)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def where_equal(**columns: str) -> str:
    """A Lance filter ``a = 'x' AND b = 'y'`` with every value quoted as an SQL string literal."""
    return " AND ".join(f"{name} = {_literal(value)}" for name, value in columns.items())


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def where_in(column: str, values: Sequence[str]) -> str:
    """A Lance filter ``column IN ('x', 'y')`` with every value quoted (``false`` for no values)."""
    if not values:
        return "false"
    return f"{column} IN ({', '.join(_literal(v) for v in values)})"


def tag_name(checkpoint_id: str) -> str:
    """Lance tag for a checkpoint: ``ckpt-`` + the id with characters outside [A-Za-z0-9._-] replaced."""
    return "ckpt-" + re.sub(r"[^A-Za-z0-9._-]", "_", checkpoint_id)


def store_exists(root: str | Path) -> bool:
    """True when ``root`` holds a lineage store (its ``store.json`` or its Lance tables)."""
    root = Path(root)
    return (root / "store.json").is_file() or (root / "lance").is_dir()


def open_existing(root: str | Path) -> LineageStore:
    """Open the store at ``root`` for reading; a folder without one is a :class:`StorageError` and is not created."""
    if not store_exists(root):
        raise StorageError(
            f"{Path(root).parent} holds no lineage store: run `dda ingest` and `dda index` (or `dda demo`) first, "
            "or pass the right --data-dir"
        )
    return LineageStore.open(root)


class LineageStore:
    """All tables of one data folder. Open with :meth:`open`; every method is a function of its inputs."""

    def __init__(self, root: Path, meta: StoreMeta | None) -> None:
        self.root = root
        self.meta = meta
        self.db = lancedb.connect(str(root / "lance"))

    @classmethod
    def open(
        cls, root: str | Path, projection_fingerprint: str | None = None, dim: int | None = None,
        layout: list[dict[str, Any]] | None = None,
    ) -> LineageStore:  # fmt: skip
        """Open (or create) the store at ``root``.

        With ``projection_fingerprint`` and ``dim`` (and the module ``layout``): a new store records them;
        an existing one must match them, else :class:`FingerprintMismatchError` names both values. Without
        them the store is opened as it is (for reading and SQL).
        """
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        meta_path = root / "store.json"
        meta = StoreMeta(**json.loads(meta_path.read_text())) if meta_path.exists() else None
        if meta is not None and meta.schema_version != SCHEMA_VERSION:
            raise StorageError(
                f"store {root} has schema version {meta.schema_version}, this code reads {SCHEMA_VERSION}: "
                "re-index into a new data folder"
            )
        if projection_fingerprint is not None:
            if dim is None:
                raise ValueError("opening a store for writing needs both projection_fingerprint and dim")
            if meta is None:
                meta = StoreMeta(SCHEMA_VERSION, projection_fingerprint, dim, utcnow().isoformat(), list(layout or []))
                _write_json_atomic(meta_path, asdict(meta))
            elif (meta.projection_fingerprint, meta.dim) != (projection_fingerprint, dim):
                raise FingerprintMismatchError(
                    f"store {root} holds projection {meta.projection_fingerprint} (dim {meta.dim}), asked for "
                    f"{projection_fingerprint} (dim {dim}): use the store's projection settings or another data folder"
                )
        return cls(root, meta)

    # -- tables ---------------------------------------------------------------------------------

    def _dim(self) -> int:
        if self.meta is None:
            raise StorageError(f"store {self.root} has no projection yet: index a checkpoint first")
        return self.meta.dim

    def has_table(self, name: str) -> bool:
        """True when table ``name`` exists."""
        return name in self.db.list_tables().tables

    def table(self, name: str) -> Any:
        """The LanceDB table ``name``, created empty with its pinned schema on first use."""
        if name not in TABLE_KEYS:
            raise StorageError(f"unknown table {name!r}: the store has {', '.join(TABLE_KEYS)}")
        dim = self._dim() if name in ("embeddings", "query_embeddings") else 1
        version = FILE_VERSION.get(name)
        schema = table_schema(name, dim)
        # Two task threads or Dask worker processes creating one table race: the loser's create commits as an
        # Overwrite and the winner's first write fails (Lance: "incompatible with concurrent transaction Overwrite").
        with _CREATE_GUARD, FileLock(self.root / CREATE_LOCK_FILE):
            table = self.db.create_table(name, schema=schema, exist_ok=True, data_storage_version=version)
            have = set(table.schema.names)
            added = [f for f in schema if f.name not in have and f.nullable]
            if added:  # a nullable column added to the schema since the table was written: null in old rows
                table.add_columns(added)
            return table

    def upsert(self, name: str, data: pa.Table) -> int:
        """Insert-or-replace rows of ``data`` on the table's natural key; returns rows inserted (not updated)."""
        if data.num_rows == 0:
            return 0
        table = self.table(name)
        data = data.select(table.schema.names).cast(table.schema)
        result = (
            table.merge_insert(list(TABLE_KEYS[name]))
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(data)
        )
        return int(result.num_inserted_rows)

    def read(
        self, name: str, columns: Sequence[str] | None = None, where: str | None = None, as_of: int | str | None = None
    ) -> pa.Table:
        """Rows of ``name`` (only ``columns``, filtered by a Lance SQL ``where``), as of a version or tag."""
        if not self.has_table(name):
            empty = table_schema(name, self.meta.dim if self.meta else 1).empty_table()
            return empty.select(list(columns)) if columns else empty
        table = self.db.open_table(name)
        if as_of is not None:
            table.checkout(as_of)
        result: pa.Table = table.to_lance().to_table(columns=list(columns) if columns else None, filter=where)
        return result

    def compact(self, names: Sequence[str]) -> None:
        """Merge the small files of tables ``names`` (one per write) into fragments of up to
        :data:`FRAGMENT_ROWS` rows and fold new rows into their scalar indexes (created on first use,
        :data:`SCALAR_INDEXES`). Fragments a tag uses are never rewritten: a tagged checkpoint keeps its files and
        nothing is stored twice. A new version: earlier ones and tags stay readable."""
        for name in names:
            if not self.has_table(name):
                continue
            table = self.db.open_table(name)
            indexed = {tuple(i.columns) for i in table.list_indices()}
            for column in SCALAR_INDEXES.get(name, ()):
                if (column,) not in indexed and table.count_rows() > 0:
                    table.create_index(column, config=Bitmap())  # few distinct values: a bitmap per checkpoint
            dataset = table.to_lance()
            pinned = {
                f.fragment_id for tag in dataset.tags.list() for f in dataset.checkout_version(tag).get_fragments()
            }
            dataset.optimize.compact_files(target_rows_per_fragment=FRAGMENT_ROWS, excluded_fragment_ids=sorted(pinned))
            dataset.optimize.optimize_indices()

    def prune(self, names: Sequence[str], older_than: timedelta = RETENTION) -> int:
        """Delete the files of versions of ``names`` older than ``older_than`` that no tag and no later version
        uses; returns bytes removed. The window protects readers still on an old snapshot."""
        removed = 0
        for name in names:
            if self.has_table(name):
                stats = (
                    self.db.open_table(name)
                    .to_lance()
                    .cleanup_old_versions(older_than=older_than, error_if_tagged_old_versions=False)
                )
                removed += int(stats.bytes_removed)
        return removed

    def tag_checkpoint(self, checkpoint_id: str) -> str:
        """Tag the current ``embeddings`` and ``checkpoints`` versions as ``ckpt-<id>``; returns the tag."""
        tag = tag_name(checkpoint_id)
        for name in ("embeddings", "checkpoints"):
            table = self.table(name)
            if tag in table.tags.list():
                table.tags.update(tag, table.version)
            else:
                table.tags.create(tag, table.version)
        return tag

    def disk_bytes(self, name: str) -> int:
        """Bytes on disk of table ``name`` (every version's files)."""
        folder = self.root / "lance" / f"{name}.lance"
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
