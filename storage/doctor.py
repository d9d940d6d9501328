"""Find and repair rows that share a natural key (a store damaged by writers that ran without the lock).

Every table is keyed by natural ids (:data:`storage.schemas.TABLE_KEYS`); two rows with one key can only
come from two writers that met without the data folder's lock (a store written by an older version,
or by hand). :func:`find_duplicates` reports them; :func:`repair` removes them, each table in one
atomic Lance commit:

- in every table but ``dda_state`` the newest row of each key is kept (by the table's timestamp column)
  and the other copies are deleted by row id;
- ``dda_state`` holds running sums whose copies may have folded different checkpoints: the state of
  every affected (query, settings) is deleted whole and rebuilt by the next refresh
  (``dda attribute --query-id …`` or the watcher's next pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from storage.schemas import TABLE_KEYS
from storage.store import LineageStore, where_equal, where_in

NEWEST = {
    "samples": "ingested_at", "checkpoints": "indexed_at", "queries": "created_at", "sample_sets": "created_at",
    "scores": "written_at", "dda_state": "updated_at", "runs": "started_at",
}  # fmt: skip


@dataclass(frozen=True)
class Duplicates:
    """Rows of ``table`` that share a natural key: how many keys, how many surplus rows, one example key."""

    table: str
    keys: tuple[str, ...]
    n_keys: int
    n_surplus: int
    example: dict[str, Any]


def _over_keys(store: LineageStore, table: str, columns: Sequence[str], sql: str) -> list[dict[str, Any]]:
    """Rows of ``sql`` over ``t`` = ``columns`` (plus ``_rowid``) of ``table``, on a private DuckDB connection."""
    rows = store.db.open_table(table).to_lance().to_table(columns=list(columns), with_row_id=True)
    con = duckdb.connect(":memory:")
    try:
        con.register("t", rows)
        result: list[dict[str, Any]] = con.sql(sql).to_arrow_table().to_pylist()
        return result
    finally:
        con.close()


def find_duplicates(store: LineageStore) -> list[Duplicates]:
    """Every table's keys held by more than one row (empty list: the store is sound)."""
    found = []
    for table, keys in TABLE_KEYS.items():
        if not store.has_table(table):
            continue
        cols = ", ".join(keys)
        hits = _over_keys(
            store, table, keys, f"SELECT {cols}, count(*) AS n FROM t GROUP BY {cols} HAVING n > 1 ORDER BY {cols}"
        )
        if hits:
            example = {k: hits[0][k] for k in keys}
            found.append(Duplicates(table, keys, len(hits), sum(h["n"] - 1 for h in hits), example))
    return found


def _surplus_row_ids(store: LineageStore, table: str, keys: Sequence[str]) -> list[int]:
    """Row ids of every copy but the newest (then the first written) of each repeated key."""
    newest = NEWEST.get(table)  # vectors have no timestamp: copies of one key are the same computation
    order = f"{newest} DESC, _rowid" if newest else "_rowid"
    sql = (
        f"SELECT _rowid FROM (SELECT _rowid, row_number() OVER (PARTITION BY {', '.join(keys)} "
        f"ORDER BY {order}) AS r FROM t) WHERE r > 1"
    )
    return [int(r["_rowid"]) for r in _over_keys(store, table, [*keys, newest] if newest else keys, sql)]


def _affected_states(store: LineageStore) -> set[tuple[str, str]]:
    """(query_id, settings_fingerprint) of every running state held by more than one row."""
    sql = "SELECT query_id, settings_fingerprint FROM t GROUP BY query_id, settings_fingerprint HAVING count(*) > 1"
    hits = _over_keys(store, "dda_state", TABLE_KEYS["dda_state"], sql)
    return {(str(h["query_id"]), str(h["settings_fingerprint"])) for h in hits}


def repair(store: LineageStore) -> list[str]:
    """Remove every duplicate found by :func:`find_duplicates`; returns one line per table repaired.

    Call it holding the data folder's writer lock.
    """
    done = []
    for dup in find_duplicates(store):
        table = store.db.open_table(dup.table)
        if dup.table == "dda_state":
            affected = _affected_states(store)
            for fp in sorted({f for _, f in affected}):
                queries = sorted(q for q, f in affected if f == fp)
                table.delete(f"{where_equal(settings_fingerprint=fp)} AND {where_in('query_id', queries)}")
            names = sorted({q for q, _ in affected})
            done.append(
                f"dda_state: deleted the running state of {len(names)} queries ({', '.join(names[:5])}"
                f"{' …' if len(names) > 5 else ''}); `dda attribute --query-id ID` or the next watcher pass rebuilds it"
            )
            continue
        surplus = _surplus_row_ids(store, dup.table, dup.keys)
        table.delete(f"_rowid IN ({', '.join(str(r) for r in surplus)})")
        done.append(f"{dup.table}: removed {len(surplus)} surplus copies of {dup.n_keys} keys (kept the newest row)")
    return done
