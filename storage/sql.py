"""DuckDB SQL over the lineage store: the views of docs/store.md, named lineage queries, and a
read-only gate for user SQL.

Each call opens an in-memory DuckDB connection, registers the Lance tables as lazy scans
(``to_lance()``, filters pushed down), creates the views, then locks the connection down: no file
access, no replacement scans, no extension install or auto-load, a memory limit and a thread count,
no spilling to disk, configuration locked. User SQL must be exactly one SELECT/WITH query; it runs
under a wall-clock timeout that interrupts it, and at most ``max_rows`` rows are fetched.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from storage.errors import ReadOnlySQLError, StorageError
from storage.schemas import table_schema
from storage.store import LineageStore

BASE_TABLES = (
    "samples", "checkpoints", "queries", "query_groups", "derived_corrections", "sample_sets", "scores", "dda_state",
    "runs", "trace_status",
)  # fmt: skip
MEMORY_LIMIT = "2GB"
THREADS = 2


def _influence_view(column: str) -> str:
    """Per (query, ``column`` value): Σ dda_score, its share of the positive influence Σ max(dda_score, 0), count."""
    return f"""
        SELECT l.query_id, coalesce(s.{column}, '(unknown)') AS {column}, sum(l.dda_score) AS total_score,
               sum(greatest(l.dda_score, 0)) / nullif(sum(sum(greatest(l.dda_score, 0)))
                   OVER (PARTITION BY l.query_id, l.settings_fingerprint), 0) AS share,
               count(*) AS n_samples, l.settings_fingerprint
        FROM lineage_all l JOIN samples s USING (sample_id)
        GROUP BY l.query_id, l.settings_fingerprint, coalesce(s.{column}, '(unknown)')"""


VIEWS: dict[str, str] = {
    "samples": "SELECT sample_id, dataset, source, license, prompt, response, n_tokens, content_hash, meta_json, "
    "ingested_at FROM _samples",
    "checkpoints": "SELECT checkpoint_id, run_id, role, step, epoch, learning_rate, path, fingerprint, "
    "projection_fingerprint, indexed_at FROM _checkpoints",
    "queries": "SELECT query_id, prompt, response, corrected, meta_json, created_at FROM _queries",
    # A query group is a row of ``queries`` (query_id 'group:<name>') with its lineage; here, its members.
    "query_groups": "SELECT group_id, query_id, added_at FROM _query_groups",
    # The correction the counterfactual query derived for an output without one, per checkpoint.
    "derived_corrections": "SELECT query_id, checkpoint_id, response, position, token, replacement, gain, "
    "coalesce(gain_is_bound, false) AS gain_is_bound, derived_at FROM _derived_corrections",
    # Outputs whose last tracing attempt failed: where (checkpoint, stage) and why; the others were traced.
    "failed_outputs": "SELECT query_id, checkpoint_id, stage, error, updated_at AS failed_at FROM _trace_status "
    "WHERE status = 'failed'",
    # Stored compactly (one row per query × checkpoint, or per query, holding a vector aligned with a sample
    # set); unnested here into one row per sample. s_t^db = s̃_t − λ·s̃_0 is the formula the state folded.
    "scores_all": """
        SELECT query_id, sample_id, checkpoint_id, score, base_score,
               score - debias_coefficient * base_score AS debiased_score, weight, settings_fingerprint, written_at
        FROM (
            SELECT s.query_id, unnest(ss.sample_ids) AS sample_id, s.checkpoint_id, unnest(s.score) AS score,
                   unnest(b.score) AS base_score, s.debias_coefficient, s.weight, s.settings_fingerprint, s.written_at
            FROM _scores s
            JOIN _scores b ON b.query_id = s.query_id AND b.settings_fingerprint = s.settings_fingerprint
                AND b.checkpoint_id = 'base' AND b.sample_set_id = s.sample_set_id
            JOIN _sample_sets ss ON ss.sample_set_id = s.sample_set_id
            WHERE s.checkpoint_id <> 'base')""",
    "lineage_all": """
        SELECT query_id, sample_id, dda_score, n_checkpoints,
               row_number() OVER (PARTITION BY query_id, settings_fingerprint
                                  ORDER BY dda_score DESC, sample_id) AS rank,
               updated_at, settings_fingerprint
        FROM (
            SELECT query_id, sample_id, weighted_sum / total_weight AS dda_score, n_checkpoints, updated_at,
                   settings_fingerprint
            FROM (
                SELECT d.query_id, unnest(ss.sample_ids) AS sample_id, unnest(d.weighted_sum) AS weighted_sum,
                       d.total_weight, len(d.checkpoints) AS n_checkpoints, d.updated_at, d.settings_fingerprint
                FROM _dda_state d JOIN _sample_sets ss USING (sample_set_id)))""",
    "source_influence_all": _influence_view("source"),
    "license_influence_all": _influence_view("license"),
    "runs": "SELECT * FROM _runs",
}

NAMED_QUERIES: dict[str, str] = {
    "top_sources": """
        SELECT l.rank, l.sample_id, l.dda_score, s.source, s.license, s.prompt, s.response
        FROM lineage_all l JOIN samples s USING (sample_id)
        WHERE l.query_id = $query_id AND l.settings_fingerprint = $fp AND l.rank <= $k ORDER BY l.rank""",
    "influence_by_source": """
        SELECT source, total_score, share, n_samples FROM source_influence
        WHERE query_id = $query_id AND settings_fingerprint = $fp ORDER BY share DESC NULLS LAST, source""",
    "influence_by_license": """
        SELECT license, total_score, share, n_samples FROM license_influence
        WHERE query_id = $query_id AND settings_fingerprint = $fp ORDER BY share DESC NULLS LAST, license""",
    "recurring_samples": """
        SELECT sample_id, count(DISTINCT query_id) AS n_queries, avg(rank) AS mean_rank, sum(dda_score) AS total_score
        FROM lineage WHERE rank <= $k AND settings_fingerprint = $fp GROUP BY sample_id
        ORDER BY n_queries DESC, mean_rank, sample_id LIMIT $limit""",
    "sample_history": """
        SELECT c.step, c.epoch, sc.checkpoint_id, sc.score, sc.base_score, sc.debiased_score,
               sum(sc.weight * sc.debiased_score) OVER w / sum(sc.weight) OVER w AS smoothed
        FROM scores sc JOIN checkpoints c USING (checkpoint_id)
        WHERE sc.query_id = $query_id AND sc.sample_id = $sample_id AND sc.settings_fingerprint = $fp
        WINDOW w AS (PARTITION BY sc.settings_fingerprint ORDER BY c.step ROWS UNBOUNDED PRECEDING)
        ORDER BY c.step""",
}


# The parameters of each named query and their types (``fp``, the settings fingerprint, is always given).
NAMED_PARAMS: dict[str, dict[str, type]] = {
    "top_sources": {"query_id": str, "k": int},
    "influence_by_source": {"query_id": str},
    "influence_by_license": {"query_id": str},
    "recurring_samples": {"k": int, "limit": int},
    "sample_history": {"query_id": str, "sample_id": str},
}


# Views that hold rows of every settings fingerprint (``<name>_all``); ``<name>`` shows the rows of one.
FINGERPRINTED = ("scores", "lineage", "source_influence", "license_influence")


def _relation(store: LineageStore, name: str) -> Any:
    if store.has_table(name):
        return store.db.open_table(name).to_lance()
    return table_schema(name, 1).empty_table()


def _register(con: duckdb.DuckDBPyConnection, store: LineageStore, name: str) -> None:
    """``_<name>``: the table as stored, with any nullable column added to the schema since it was written as null
    (reading never writes: the column is added to the table itself on its next write)."""
    relation = _relation(store, name)
    missing = [f for f in table_schema(name, 1) if f.name not in relation.schema.names]
    if not missing:
        con.register(f"_{name}", relation)
        return
    con.register(f"__{name}", relation)
    types = con.from_arrow(pa.table({f.name: pa.nulls(0, f.type) for f in missing})).dtypes
    nulls = ", ".join(f'NULL::{t} AS "{f.name}"' for f, t in zip(missing, types, strict=True))
    con.execute(f"CREATE VIEW _{name} AS SELECT *, {nulls} FROM __{name}")


def connect(
    store: LineageStore,
    memory_limit: str = MEMORY_LIMIT,
    threads: int = THREADS,
    settings_fingerprint: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's views, locked down for read-only use.

    ``scores``, ``lineage``, ``source_influence`` and ``license_influence`` show the rows of
    ``settings_fingerprint`` (the current settings; None: of every fingerprint), their ``…_all`` twins the rows of
    every fingerprint. Bounded: ``memory_limit`` and ``threads``; no temporary folder (a query that outgrows the
    memory limit fails instead of spilling to disk); extensions are never installed or auto-loaded.
    """
    con = duckdb.connect(":memory:")
    for name in BASE_TABLES:
        _register(con, store, name)
    for name, body in VIEWS.items():
        con.execute(f"CREATE VIEW {name} AS {body}")
    for name in FINGERPRINTED:
        literal = None if settings_fingerprint is None else settings_fingerprint.replace("'", "''")
        where = "" if literal is None else f" WHERE settings_fingerprint = '{literal}'"
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM {name}_all{where}")
    for setting, value in (
        ("memory_limit", f"'{memory_limit}'"), ("threads", str(int(threads))), ("temp_directory", "''"),
        ("autoinstall_known_extensions", "false"), ("autoload_known_extensions", "false"),
        ("python_enable_replacements", "false"), ("enable_external_access", "false"), ("lock_configuration", "true"),
    ):  # fmt: skip
        con.execute(f"SET {setting} = {value}")
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise :class:`ReadOnlySQLError` unless ``sql`` is exactly one SELECT (or WITH … SELECT) statement."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise ReadOnlySQLError(f"SQL does not parse: {str(e).splitlines()[0]}") from e
    if len(statements) != 1:
        raise ReadOnlySQLError(f"expected one SELECT statement, got {len(statements)}: run them one at a time")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise ReadOnlySQLError(
            f"only SELECT/WITH queries are allowed, got {kind.name}: the lineage store is read-only through SQL"
        )


@dataclass(frozen=True)
class Result:
    """Rows of a query (at most ``max_rows``) and whether more rows were left unread."""

    table: pa.Table
    truncated: bool


TRUNCATED = object()  # what :func:`stream` yields last when ``max_rows`` left rows unread


def stream(
    store: LineageStore, sql: str, params: Mapping[str, Any] | None = None, timeout: float | None = None,
    max_rows: int | None = None, settings_fingerprint: str | None = None, batch_rows: int = 65536,
) -> Iterator[Any]:  # fmt: skip
    """The rows of one read-only query over the views, as Arrow record batches of ≤ ``batch_rows`` rows, read as
    they are consumed (memory stays bounded for an export of any size); at most ``max_rows`` rows (None: every
    row), then :data:`TRUNCATED` if more were left. Stopped after ``timeout`` seconds.

    Raises :class:`ReadOnlySQLError` for anything but one SELECT or for file access, and
    :class:`StorageError` with one line for every other failure (timeout, memory limit, SQL error).
    """
    con = connect(store, settings_fingerprint=settings_fingerprint)
    timer = threading.Timer(timeout, con.interrupt) if timeout is not None else None
    try:
        check_read_only(con, sql)
        if timer is not None:
            timer.start()
        relation = con.sql(sql, params=dict(params) if params else None)  # streamed: a row cap stops early
        reader = relation.to_arrow_reader(max(1, min(max_rows or batch_rows, batch_rows)))
        n, empty = 0, True
        for batch in reader:
            if max_rows is not None and n + batch.num_rows > max_rows:
                yield batch.slice(0, max_rows - n)
                yield TRUNCATED
                return
            n, empty = n + batch.num_rows, False
            yield batch
        if empty:  # no rows: one empty batch still carries the columns
            yield pa.RecordBatch.from_pylist([], schema=reader.schema)
    except duckdb.InterruptException as e:
        why = f"after the {timeout:g} s timeout" if timeout is not None else "by an interrupt"
        raise StorageError(f"SQL stopped {why}: add a WHERE or LIMIT, or raise --timeout") from e
    except duckdb.OutOfMemoryException as e:
        raise StorageError(f"SQL ran out of its {MEMORY_LIMIT} memory limit: add a WHERE or LIMIT") from e
    except duckdb.PermissionException as e:
        raise ReadOnlySQLError(f"SQL may not read or write files: {str(e).splitlines()[0]}") from e
    except duckdb.Error as e:
        raise StorageError(f"SQL error: {str(e).splitlines()[0]}") from e
    finally:
        if timer is not None:
            timer.cancel()
        con.close()


def run(
    store: LineageStore, sql: str, params: Mapping[str, Any] | None = None, timeout: float | None = None,
    max_rows: int | None = None, settings_fingerprint: str | None = None,
) -> Result:  # fmt: skip
    """Every row of one read-only query (at most ``max_rows``) as one Arrow table; errors as :func:`stream`."""
    got = list(stream(store, sql, params, timeout, max_rows, settings_fingerprint))
    truncated = got[-1] is TRUNCATED
    return Result(pa.Table.from_batches(got[:-1] if truncated else got), truncated)


def query(store: LineageStore, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
    """Every row of one read-only query over the views, as an Arrow table (no timeout: internal reads).

    Errors as :func:`run`.
    """
    return run(store, sql, params).table


def named_params(name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` parameters of named query ``name`` converted to the types of :data:`NAMED_PARAMS`.

    Raises :class:`StorageError` naming an unknown query, a missing or unknown parameter, or a value
    that does not convert (e.g. ``k=ten``).
    """
    if name not in NAMED_QUERIES:
        raise StorageError(f"unknown lineage query {name!r}: choose one of {', '.join(NAMED_QUERIES)}")
    signature = NAMED_PARAMS[name]
    wanted = ", ".join(f"{p}={t.__name__}" for p, t in signature.items())
    unknown = sorted(set(raw) - set(signature))
    missing = [p for p in signature if p not in raw]
    if unknown or missing:
        problem = f"unknown parameter {unknown[0]!r}" if unknown else f"missing parameter {missing[0]!r}"
        raise StorageError(f"{name}: {problem}; it takes {wanted}")
    typed: dict[str, Any] = {}
    for p, kind in signature.items():
        try:
            typed[p] = kind(raw[p])
        except (TypeError, ValueError) as e:
            raise StorageError(f"{name}: parameter {p}={raw[p]!r} is not a {kind.__name__}; it takes {wanted}") from e
    return typed


def named_query(
    store: LineageStore, name: str, settings_fingerprint: str, timeout: float | None = None,
    max_rows: int | None = None, **params: Any,
) -> pa.Table:  # fmt: skip
    """Run one of :data:`NAMED_QUERIES` under one scoring configuration (e.g. ``top_sources(query_id=…, k=10)``).

    A store may hold lineage under several settings fingerprints; every named query reads one of them.
    Parameters are converted to the query's signature (:func:`named_params`).
    """
    typed = named_params(name, params)
    return run(store, NAMED_QUERIES[name], {**typed, "fp": settings_fingerprint}, timeout, max_rows).table


def _column_values(column: pa.ChunkedArray) -> list[Any]:
    """Python values of a column; values Python cannot hold (e.g. dates beyond year 9999) as their text."""
    try:
        values: list[Any] = column.to_pylist()
        return values
    except (ValueError, OverflowError, ArithmeticError, pa.ArrowException):
        pass
    try:
        text: list[Any] = column.cast(pa.string()).to_pylist()
        return text
    except (ValueError, OverflowError, ArithmeticError, pa.ArrowException, NotImplementedError):
        return [f"({column.type} value)"] * len(column)


def render(table: pa.Table, fmt: str = "table", max_width: int = 60, header: bool = True) -> str:
    """``table`` as text: an aligned text table (cells cut to ``max_width``), CSV (its header line unless
    ``header`` is False: a later batch of a streamed export), or JSON lines.

    Values Python cannot represent are rendered as text; any other rendering failure is a one-line
    :class:`StorageError`.
    """
    if fmt not in ("table", "csv", "json"):
        raise StorageError(f"unknown output format {fmt!r}: choose table, csv or json")
    try:
        return _render(table, fmt, max_width, header)
    except Exception as e:  # a result DuckDB produced but we cannot print: one line, never a traceback
        raise StorageError(f"cannot render the result as {fmt}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def render_stream(chunks: Iterable[Any], fmt: str = "table") -> Iterator[Any]:
    """Text of what :func:`stream` yields, in ``fmt``: one aligned table of every batch, or CSV (one header line)
    and JSON lines batch by batch, so that an export never holds more than a batch; :data:`TRUNCATED` passes
    through last."""
    if fmt == "table":
        got = list(chunks)
        truncated = got[-1] is TRUNCATED
        yield render(pa.Table.from_batches(got[:-1] if truncated else got), "table")
        if truncated:
            yield TRUNCATED
        return
    first = True
    for batch in chunks:
        if batch is TRUNCATED:
            yield TRUNCATED
            return
        text = render(pa.Table.from_batches([batch]), fmt, header=first)
        first = False
        if text:
            yield text


def _render(table: pa.Table, fmt: str, max_width: int, header: bool = True) -> str:
    names = table.column_names
    columns = [_column_values(table.column(i)) for i in range(table.num_columns)]
    rows = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)] if columns else []
    if fmt == "json":
        return "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in rows)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")

    def cell(v: Any) -> str:
        text = f"{v:.6g}" if isinstance(v, float) else str(v)
        text = text.replace("\n", " ")
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    cells = [[cell(r[n]) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)
