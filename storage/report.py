"""What the data-governance report says, read from the SQL views of docs/store.md (no rendering here).

Every number of the report comes from one read-only DuckDB connection over the store's views, under
one scoring configuration (``settings_fingerprint``), for a chosen set of queries (default: all that
have lineage under it):

- provenance: the checkpoints (fingerprints, steps, epochs), the datasets with a version (md5 of the
  sorted content hashes of their samples), the projection fingerprint, the settings, and the flow runs
  that wrote the store under these settings (plus the indexing runs, whose settings may differ only in
  scoring);
- per query: its top-k samples with the per-checkpoint scores of the latest checkpoint folded in
  (s̃_T, s̃_0, s̃_T − λ s̃_0) and the smoothed DDA score S; the trajectory of the top samples over the
  checkpoints (with the running smoothed mean); the influence shares by source and by license;
- across queries: sources and licenses ranked by Σ_q total_score(q, ·) over the chosen queries, and the
  samples that recur in the top-k of several queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb

from storage.errors import DamagedStoreError, StorageError
from storage.provenance import DATASET_VERSION
from storage.sql import connect
from storage.store import LineageStore, utcnow

Row = dict[str, Any]
INDEX_FLOWS = ("dda-index-run", "dda-watch-checkpoints", "dda-index-checkpoint")

SQL: dict[str, str] = {
    "fingerprints": """
        SELECT settings_fingerprint, count(DISTINCT query_id) AS n_queries FROM lineage
        GROUP BY settings_fingerprint ORDER BY n_queries DESC, settings_fingerprint""",
    "query_ids": """
        SELECT DISTINCT query_id FROM lineage WHERE settings_fingerprint = $fp ORDER BY query_id""",
    "repeated_state": """
        SELECT query_id, count(*) AS n FROM _dda_state
        WHERE settings_fingerprint = $fp AND list_contains($ids, query_id)
        GROUP BY query_id HAVING n > 1 ORDER BY query_id LIMIT 1""",
    "queries": """
        SELECT q.query_id, q.prompt, q.response, q.corrected, q.created_at, max(l.n_checkpoints) AS n_checkpoints,
               count(l.sample_id) AS n_samples
        FROM queries q JOIN lineage l ON l.query_id = q.query_id AND l.settings_fingerprint = $fp
        WHERE list_contains($ids, q.query_id) GROUP BY ALL ORDER BY q.query_id""",
    # The correction the counterfactual query derived at the latest checkpoint that has one, per query.
    "derived": """
        SELECT d.query_id, d.checkpoint_id, d.response, d.token, d.replacement, d.gain, d.gain_is_bound
        FROM derived_corrections d JOIN checkpoints c USING (checkpoint_id)
        WHERE list_contains($ids, d.query_id)
        QUALIFY row_number() OVER (PARTITION BY d.query_id ORDER BY c.role = 'base', c.step DESC) = 1
        ORDER BY d.query_id""",
    "checkpoints": """
        SELECT checkpoint_id, run_id, role, step, epoch, learning_rate, fingerprint, projection_fingerprint, path,
               indexed_at
        FROM checkpoints ORDER BY role <> 'base', step, checkpoint_id""",
    "datasets": f"""
        SELECT dataset, count(*) AS n_samples, {DATASET_VERSION} AS version,
               string_agg(DISTINCT coalesce(source, '(unknown)'), ', ' ORDER BY coalesce(source, '(unknown)'))
                   AS sources,
               string_agg(DISTINCT coalesce(license, '(unknown)'), ', ' ORDER BY coalesce(license, '(unknown)'))
                   AS licenses,
               min(ingested_at) AS first_ingested, max(ingested_at) AS last_ingested
        FROM samples GROUP BY dataset ORDER BY dataset""",
    "runs": """
        SELECT run_id, flow_name, status, started_at, finished_at, code_version, settings_fingerprint, wrote_json
        FROM runs WHERE settings_fingerprint = $fp OR list_contains($index_flows, flow_name)
        ORDER BY started_at, run_id""",
    "settings": """
        SELECT settings_json FROM runs WHERE settings_fingerprint = $fp ORDER BY started_at DESC LIMIT 1""",
    "top": """
        SELECT l.query_id, l.rank, l.sample_id, s.source, s.license, s.prompt, s.response, l.dda_score
        FROM lineage l JOIN samples s USING (sample_id)
        WHERE l.settings_fingerprint = $fp AND list_contains($ids, l.query_id) AND l.rank <= $k
        ORDER BY l.query_id, l.rank""",
    # Per-checkpoint scores of the top (query, sample) pairs only ($pairs: query_id || chr(31) || sample_id),
    # with the running smoothed mean; the scan is narrowed by sample first, so it never ranks every score.
    "pair_scores": """
        SELECT sc.query_id, sc.sample_id, c.step, c.epoch, sc.score, sc.base_score, sc.debiased_score,
               sum(sc.weight * sc.debiased_score) OVER w / sum(sc.weight) OVER w AS smoothed
        FROM scores sc JOIN checkpoints c USING (checkpoint_id)
        WHERE sc.settings_fingerprint = $fp AND list_contains($samples, sc.sample_id)
              AND list_contains($pairs, sc.query_id || chr(31) || sc.sample_id)
        WINDOW w AS (PARTITION BY sc.query_id, sc.sample_id ORDER BY c.step ROWS UNBOUNDED PRECEDING)
        ORDER BY sc.query_id, sc.sample_id, c.step""",
    **{
        f"by_{key}": f"""
        SELECT query_id, {key}, total_score, share, n_samples FROM {key}_influence
        WHERE settings_fingerprint = $fp AND list_contains($ids, query_id)
        ORDER BY query_id, share DESC NULLS LAST, {key}"""
        for key in ("source", "license")
    },
    **{
        f"{key}_totals": f"""
        SELECT {key}, sum(total_score) AS total_score, avg(coalesce(share, 0)) AS mean_share,
               any_value(n_samples) AS n_samples
        FROM {key}_influence WHERE settings_fingerprint = $fp AND list_contains($ids, query_id)
        GROUP BY {key} ORDER BY total_score DESC, {key}"""
        for key in ("source", "license")
    },
    "recurring": """
        SELECT l.sample_id, count(*) AS n_queries, avg(l.rank) AS mean_rank, sum(l.dda_score) AS total_score,
               any_value(s.source) AS source, any_value(s.license) AS license, any_value(s.prompt) AS prompt,
               any_value(s.response) AS response
        FROM lineage l JOIN samples s USING (sample_id)
        WHERE l.settings_fingerprint = $fp AND list_contains($ids, l.query_id) AND l.rank <= $k
        GROUP BY l.sample_id HAVING count(*) >= 2
        ORDER BY n_queries DESC, mean_rank, l.sample_id LIMIT $limit""",
}


@dataclass(frozen=True)
class QuerySection:
    """One traced output: the query row, its top-k samples, their trajectories, its shares, and the correction
    the counterfactual query derived at the latest checkpoint (None where none was derived)."""

    query: Row
    top: list[Row]
    trajectories: list[Row]
    by_source: list[Row]
    by_license: list[Row]
    derived: Row | None = None


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows, as rows read from the views (see the module docstring)."""

    generated_at: datetime
    store_root: str
    settings_fingerprint: str
    projection_fingerprint: str | None
    dim: int | None
    settings_json: str | None
    top_k: int
    checkpoints: list[Row]
    datasets: list[Row]
    runs: list[Row]
    queries: list[QuerySection]
    source_totals: list[Row]
    license_totals: list[Row]
    recurring: list[Row]
    other_fingerprints: list[Row] = field(default_factory=list)


def _rows(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> list[Row]:
    rows: list[Row] = con.sql(SQL[name], params=params).to_arrow_table().to_pylist()
    return rows


def _group(rows: list[Row], key: str = "query_id") -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def _chosen_ids(con: duckdb.DuckDBPyConnection, fp: str, query_ids: list[str] | None) -> list[str]:
    """``query_ids`` (every one must have lineage under ``fp``), or every query with lineage under ``fp``."""
    have = [r["query_id"] for r in _rows(con, "query_ids", fp=fp)]
    if not have:
        known = _rows(con, "fingerprints")
        where = ", ".join(f"{r['settings_fingerprint']} ({r['n_queries']} queries)" for r in known)
        hint = f"the store has lineage under {where}: pass that settings fingerprint" if known else (
            "run `dda index` and `dda attribute` first"
        )  # fmt: skip
        raise StorageError(f"no lineage under settings {fp}: {hint}")
    if query_ids is None:
        return have
    missing = sorted(set(query_ids) - set(have))
    if missing:
        raise StorageError(
            f"no lineage for quer{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)} under settings {fp}: "
            'choose registered query ids (`dda sql "SELECT query_id FROM queries"`) or run `dda attribute`'
        )
    return sorted(set(query_ids))


def gather(
    store: LineageStore,
    settings_fingerprint: str,
    query_ids: list[str] | None = None,
    top_k: int = 10,
    n_trajectories: int = 5,
    n_recurring: int = 10,
) -> ReportData:
    """Read the report's rows from the views (one connection); unknown queries or no lineage raise StorageError."""
    if top_k < 1 or n_trajectories < 0 or n_recurring < 0:
        raise StorageError(f"top_k must be ≥ 1 and the other counts ≥ 0, got {top_k}, {n_trajectories}, {n_recurring}")
    con = connect(store)
    try:
        return _read(con, store, settings_fingerprint, query_ids, top_k, n_trajectories, n_recurring)
    except duckdb.Error as e:
        message = f"report SQL failed: {str(e).splitlines()[0]}"
    except StorageError as e:
        message = str(e)
    finally:
        con.close()
        del con  # a failed flow keeps its exception: no frame of it may hold the connection
    raise StorageError(message)


def _top_and_trajectories(
    con: duckdb.DuckDBPyConnection, fp: str, ids: list[str], top_k: int, n_trajectories: int
) -> tuple[dict[str, list[Row]], dict[str, list[Row]]]:
    """Per query: its top-k rows with the scores of the latest checkpoint folded in, and the per-checkpoint
    rows (with the running smoothed mean) of its top ``n_trajectories`` samples, in (rank, step) order."""
    top_rows = _rows(con, "top", fp=fp, ids=ids, k=top_k)
    pairs = {(r["query_id"], r["sample_id"]): r for r in top_rows}
    for row in top_rows:
        row.update(last_step=None, score=None, base_score=None, debiased_score=None)
    history = _rows(con, "pair_scores", fp=fp, samples=sorted({s for _, s in pairs}),
                    pairs=[f"{q}\x1f{s}" for q, s in pairs])  # fmt: skip
    paths: dict[str, list[Row]] = {}
    for h in history:  # ordered by step: the last row of a pair is the latest checkpoint folded in
        row = pairs[(h["query_id"], h["sample_id"])]
        row.update(last_step=h["step"], score=h["score"], base_score=h["base_score"],
                   debiased_score=h["debiased_score"])  # fmt: skip
        if row["rank"] <= n_trajectories:
            paths.setdefault(h["query_id"], []).append({"rank": row["rank"], **h})
    for rows in paths.values():
        rows.sort(key=lambda r: (r["rank"], r["step"]))
    return _group(top_rows), paths


def _read(
    con: duckdb.DuckDBPyConnection, store: LineageStore, fp: str, query_ids: list[str] | None,
    top_k: int, n_trajectories: int, n_recurring: int,
) -> ReportData:  # fmt: skip
    """:func:`gather` on an open connection."""
    ids = _chosen_ids(con, fp, query_ids)
    scoped = {"fp": fp, "ids": ids}
    for r in _rows(con, "repeated_state", **scoped):  # a damaged store must not give a confident report
        raise DamagedStoreError(
            f"table dda_state holds {r['n']} rows for query {r['query_id']!r}: "
            "two writers met without the lock; run `dda doctor --repair`"
        )
    top, paths = _top_and_trajectories(con, fp, ids, top_k, n_trajectories)
    sources = _group(_rows(con, "by_source", **scoped))
    licenses = _group(_rows(con, "by_license", **scoped))
    derived = {r["query_id"]: r for r in _rows(con, "derived", ids=ids)}
    sections = [
        QuerySection(q, top.get(q["query_id"], []), paths.get(q["query_id"], []),
                     sources.get(q["query_id"], []), licenses.get(q["query_id"], []), derived.get(q["query_id"]))
        for q in _rows(con, "queries", **scoped)
    ]  # fmt: skip
    settings = _rows(con, "settings", fp=fp)
    return ReportData(
        generated_at=utcnow(),
        store_root=str(store.root),
        settings_fingerprint=fp,
        projection_fingerprint=store.meta.projection_fingerprint if store.meta else None,
        dim=store.meta.dim if store.meta else None,
        settings_json=settings[0]["settings_json"] if settings else None,
        top_k=top_k,
        checkpoints=_rows(con, "checkpoints"),
        datasets=_rows(con, "datasets"),
        runs=_rows(con, "runs", fp=fp, index_flows=list(INDEX_FLOWS)),
        queries=sections,
        source_totals=_rows(con, "source_totals", **scoped),
        license_totals=_rows(con, "license_totals", **scoped),
        recurring=_rows(con, "recurring", k=top_k, limit=n_recurring, **scoped),
        other_fingerprints=[r for r in _rows(con, "fingerprints") if r["settings_fingerprint"] != fp],
    )
