"""DuckDB views and named lineage queries against pure-Python references; hostile SQL is refused."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from storage.errors import ReadOnlySQLError, StorageError
from storage.scores import StoredState, read_dda_state, write_dda_state
from storage.sql import named_params, named_query, query, render, run
from tests.storage.helpers import SAMPLES, SETTINGS, SOURCES, N, lineage_world


@pytest.fixture
def world(tmp_path):
    """A store with 12 samples, 2 queries, base + 3 checkpoints of scores and the running state."""
    return lineage_world(tmp_path)


def test_lineage_view_equals_reference(world):
    store, dda, *_ = world
    table = query(
        store, "SELECT query_id, sample_id, dda_score, n_checkpoints, rank FROM lineage ORDER BY query_id, rank"
    )
    assert table.num_rows == 2 * N
    for qi, q in enumerate(["q1", "q2"]):
        rows = [r for r in table.to_pylist() if r["query_id"] == q]
        order = np.argsort(-dda[qi], kind="stable")
        assert [r["sample_id"] for r in rows] == [SAMPLES[i] for i in order]
        np.testing.assert_allclose([r["dda_score"] for r in rows], dda[qi][order], rtol=1e-12)
        assert {r["n_checkpoints"] for r in rows} == {3}


def test_source_influence_equals_reference(world):
    store, dda, *_ = world
    got = {(r["query_id"], r["source"]): r for r in query(store, "SELECT * FROM source_influence").to_pylist()}
    for qi, q in enumerate(["q1", "q2"]):
        totals, positive = defaultdict(float), defaultdict(float)
        for i, sid in enumerate(SAMPLES):
            totals[SOURCES[sid]] += dda[qi, i]
            positive[SOURCES[sid]] += max(dda[qi, i], 0.0)
        for source in totals:
            row = got[(q, source)]
            assert row["n_samples"] == 4
            assert row["total_score"] == pytest.approx(totals[source], rel=1e-12)
            assert row["share"] == pytest.approx(positive[source] / sum(positive.values()), rel=1e-12)


def test_named_queries(world):
    store, dda, debiased, weights, _ = world
    top = named_query(store, "top_sources", SETTINGS, query_id="q2", k=3).to_pylist()
    assert [r["sample_id"] for r in top] == [SAMPLES[i] for i in np.argsort(-dda[1], kind="stable")[:3]]
    by_license = named_query(store, "influence_by_license", SETTINGS, query_id="q1").to_pylist()
    assert {r["license"] for r in by_license} == {"cc-by", "proprietary"}
    recurring = named_query(store, "recurring_samples", SETTINGS, k=3, limit=50).to_pylist()
    top_sets = [set(np.argsort(-dda[qi], kind="stable")[:3]) for qi in range(2)]
    expected = {SAMPLES[i]: sum(i in s for s in top_sets) for i in range(N) if any(i in s for s in top_sets)}
    assert {r["sample_id"]: r["n_queries"] for r in recurring} == expected
    history = named_query(store, "sample_history", SETTINGS, query_id="q1", sample_id="s004").to_pylist()
    assert [r["checkpoint_id"] for r in history] == ["c1", "c2", "c3"]
    running_num, running_den = 0.0, 0.0
    for row, c in zip(history, ["c1", "c2", "c3"], strict=True):
        running_num += weights[c] * debiased[c][0, 4]
        running_den += weights[c]
        assert row["smoothed"] == pytest.approx(running_num / running_den, rel=1e-12)
    assert history[-1]["smoothed"] == pytest.approx(dda[0, 4], rel=1e-12)
    stored = read_dda_state(store, SETTINGS, "q1")
    np.testing.assert_allclose(stored.weighted_sum[0] / stored.total_weight[0], dda[0])


HOSTILE = [
    "INSERT INTO _samples SELECT * FROM _samples",
    "DELETE FROM _scores",
    "UPDATE _dda_state SET weighted_sum = 0",
    "DROP VIEW lineage",
    "CREATE TABLE t AS SELECT 1",
    "ATTACH '/tmp/evil.db' AS evil",
    "INSTALL httpfs",
    "LOAD httpfs",
    "COPY (SELECT * FROM samples) TO '/tmp/leak.csv'",
    "EXPORT DATABASE '/tmp/leak'",
    "PRAGMA enable_profiling",
    "SET enable_external_access = true",
    "SELECT 1; DELETE FROM _scores",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM '/etc/hosts'",
    "CALL pragma_version()",
    "CHECKPOINT",
    "VACUUM",
]


@pytest.mark.parametrize("sql", HOSTILE)
def test_hostile_sql_is_refused_and_the_store_is_unchanged(world, sql, tmp_path):
    store = world[0]
    before = {t: (store.table(t).version, store.table(t).count_rows()) for t in ("samples", "scores", "dda_state")}
    with pytest.raises((ReadOnlySQLError, StorageError)):
        query(store, sql)
    after = {t: (store.table(t).version, store.table(t).count_rows()) for t in ("samples", "scores", "dda_state")}
    assert after == before
    assert not (tmp_path / "leak.csv").exists()


def test_write_statements_name_the_rule(world):
    with pytest.raises(ReadOnlySQLError, match="only SELECT/WITH queries are allowed, got DELETE"):
        query(world[0], "DELETE FROM _scores")
    with pytest.raises(ReadOnlySQLError, match="may not read or write files"):
        query(world[0], "SELECT * FROM read_csv('/etc/passwd')")
    assert query(world[0], "WITH x AS (SELECT count(*) AS n FROM samples) SELECT n FROM x").to_pylist() == [{"n": N}]


def test_named_queries_read_one_scoring_configuration(world):
    """Lineage under a second settings fingerprint must not leak into the first one's named queries."""
    store = world[0]
    before = named_query(store, "top_sources", SETTINGS, query_id="q2", k=3).to_pylist()
    other = StoredState(["q2"], SAMPLES, -np.arange(N, dtype=float)[None, :], np.array([1.0]), [frozenset({"c1"})])
    write_dda_state(store, "other-settings", other)
    assert named_query(store, "top_sources", SETTINGS, query_id="q2", k=3).to_pylist() == before
    assert [
        r["sample_id"] for r in named_query(store, "top_sources", "other-settings", query_id="q2", k=3).to_pylist()
    ] == SAMPLES[:3]


HEAVY = [
    "SELECT count(*) FROM range(100000000000) a",
    "SELECT a.range + b.range AS x FROM range(100000) a, range(100000) b ORDER BY x DESC",
    "SELECT list(range) FROM range(1000000000)",
    "SELECT string_agg(repeat('x', 1000), '') FROM range(100000000)",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
]


@pytest.mark.parametrize("sql", HEAVY)
def test_heavy_sql_is_stopped_by_the_timeout_or_the_memory_limit(world, sql, tmp_path, monkeypatch):
    store = world[0]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = {t: store.table(t).version for t in ("samples", "scores", "dda_state")}
    with pytest.raises(StorageError, match=r"timeout|memory limit") as info:
        run(store, sql, timeout=2.0)
    assert len(str(info.value).splitlines()) == 1
    assert {t: store.table(t).version for t in ("samples", "scores", "dda_state")} == before
    assert list(cwd.iterdir()) == []  # nothing spilled under the caller's working directory


def test_connection_is_bounded(world):
    got = query(
        world[0],
        "SELECT current_setting('threads') AS threads, current_setting('temp_directory') AS temp, "
        "current_setting('autoinstall_known_extensions') AS install, "
        "current_setting('autoload_known_extensions') AS autoload, current_setting('memory_limit') AS mem",
    ).to_pylist()[0]
    assert got["threads"] == 2
    assert got["temp"] == ""
    assert got["install"] is False
    assert got["autoload"] is False
    assert got["mem"].endswith("GiB")


def test_row_cap_stops_an_unbounded_result_early(world):
    result = run(world[0], "SELECT * FROM range(1000000) a, range(1000000) b", timeout=30.0, max_rows=1000)
    assert result.truncated
    assert result.table.num_rows == 1000
    assert not run(world[0], "SELECT * FROM samples", max_rows=N).truncated


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_every_duckdb_type_renders_without_a_traceback(world, fmt):
    table = run(world[0], "SELECT * FROM test_all_types()").table
    text = render(table, fmt)
    assert len(text.splitlines()) >= 3  # 3 rows (+ header lines)


def test_named_query_parameters_follow_the_signature():
    assert named_params("sample_history", {"query_id": "q1", "sample_id": "123"}) == {
        "query_id": "q1",
        "sample_id": "123",
    }
    assert named_params("top_sources", {"query_id": "7", "k": "10"}) == {"query_id": "7", "k": 10}
    with pytest.raises(StorageError, match=r"parameter k='ten' is not a int"):
        named_params("top_sources", {"query_id": "q", "k": "ten"})
    with pytest.raises(StorageError, match="missing parameter 'k'"):
        named_params("top_sources", {"query_id": "q"})
    with pytest.raises(StorageError, match="unknown parameter 'x'"):
        named_params("top_sources", {"query_id": "q", "k": "1", "x": "2"})


def test_the_current_views_show_one_settings_fingerprint_and_the_all_views_every_one(world):
    """A store scored under two settings: ``lineage`` (and ``scores``, the influence views) under the current
    fingerprint holds samples × outputs rows, ranked 1..N once per output; ``…_all`` holds both fingerprints."""
    store = world[0]
    other = StoredState(["q2"], SAMPLES, -np.arange(N, dtype=float)[None, :], np.array([1.0]), [frozenset({"c1"})])
    write_dda_state(store, "other-settings", other)

    def count(view: str, fp: str | None) -> int:
        return run(store, f"SELECT count(*) AS n FROM {view}", settings_fingerprint=fp).table.to_pylist()[0]["n"]

    assert count("lineage", SETTINGS) == 2 * N
    assert count("lineage", "other-settings") == N
    assert count("lineage_all", SETTINGS) == count("lineage", None) == 3 * N
    assert count("scores", SETTINGS) == count("scores_all", "other-settings") == 2 * 3 * N  # 2 outputs × 3 ckpts
    assert count("scores", "other-settings") == 0
    assert count("source_influence", SETTINGS) == 2 * 3  # 2 outputs × 3 sources
    ranks = run(store, "SELECT query_id, max(rank) AS top, count(DISTINCT rank) AS n FROM lineage GROUP BY query_id",
                settings_fingerprint=SETTINGS).table.to_pylist()  # fmt: skip
    assert sorted((r["query_id"], r["top"], r["n"]) for r in ranks) == [("q1", N, N), ("q2", N, N)]
    quoted = run(store, "SELECT count(*) AS n FROM lineage", settings_fingerprint="x' OR '1'='1").table
    assert quoted.to_pylist() == [{"n": 0}]  # the fingerprint is a literal, not SQL


def test_dda_sql_exports_every_row_unless_capped_and_shows_the_current_settings(world, tmp_path, capsys):
    """``--format csv`` / ``json`` return all 50 000 rows (a table shows 10 000 and says so); ``--max-rows`` caps
    an export; ``dda settings`` names the current fingerprint and the fingerprints the store holds."""
    from flows.cli import main

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "store").symlink_to(world[0].root, target_is_directory=True)
    args = ["--data-dir", str(data_dir), "--timeout", "60"]
    sql = "SELECT range AS i, 'x,y' AS text FROM range(50000)"
    assert main(["sql", sql, "--format", "csv", *args]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 50_001
    assert lines[0] == "i,text"
    assert lines[-1] == '49999,"x,y"'
    assert err == ""
    assert main(["sql", sql, "--format", "json", *args]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 50_000
    assert main(["sql", sql, "--format", "csv", "--max-rows", "100", *args]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 101
    assert "only the first 100 rows" in err
    assert main(["sql", sql, *args]) == 0
    out, err = capsys.readouterr()
    assert "(10000 rows)" in out
    assert "only the first 10000 rows" in err
    assert main(["settings", *args[:2]]) == 0
    out, err = capsys.readouterr()
    current = json.loads(out)["settings_fingerprint"]
    assert current != SETTINGS
    assert f"lineage under {SETTINGS}: 2 outputs" in err
    assert main(["sql", "SELECT count(*) AS n FROM lineage", *args]) == 0  # the store holds none under `current`
    out, err = capsys.readouterr()
    assert out.splitlines()[2].strip() == "0"
    assert f"no lineage under the current settings ({current}); the store holds {SETTINGS}" in err
    state = StoredState(["q1", "q2"], SAMPLES, np.ones((2, N)), np.ones(2), [frozenset({"c1"})] * 2)
    write_dda_state(world[0], current, state)  # now scored under two settings: SETTINGS and the current ones
    assert main(["sql", "SELECT count(*) AS n FROM lineage", *args]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[2].strip() == str(2 * N)  # samples × outputs, one ranking per output
    assert err == ""
    assert main(["sql", "SELECT count(*) AS n FROM lineage_all", *args]) == 0
    assert capsys.readouterr().out.splitlines()[2].strip() == str(4 * N)


def test_a_table_written_before_a_nullable_column_existed_reads_it_as_null_and_is_not_written(tmp_path):
    """A ``derived_corrections`` table from before ``gain_is_bound``: its view answers with the column (false: those
    searches ran to their argmax), and reading adds nothing to the stored table."""
    from datetime import datetime

    import pyarrow as pa

    from storage.schemas import table_schema
    from storage.store import LineageStore

    store = LineageStore.open(tmp_path / "store")
    old = pa.schema([f for f in table_schema("derived_corrections", 1) if f.name != "gain_is_bound"])
    row = {"query_id": "q", "checkpoint_id": "base", "response": "r", "position": 0, "token": "a", "replacement": "b",
           "gain": 1.5, "derived_at": datetime(2026, 1, 1), "response_ids": [1, 2]}  # fmt: skip
    store.db.create_table("derived_corrections", pa.Table.from_pylist([row], schema=old))
    got = query(store, "SELECT query_id, gain, gain_is_bound FROM derived_corrections").to_pylist()
    assert got == [{"query_id": "q", "gain": 1.5, "gain_is_bound": False}]
    assert "gain_is_bound" not in store.db.open_table("derived_corrections").schema.names
