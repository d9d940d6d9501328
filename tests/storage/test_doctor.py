"""A store damaged by writers that met without the lock: reads fail loudly, `dda doctor` finds and repairs it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from flows.cli import main
from storage.doctor import find_duplicates, repair
from storage.errors import DamagedStoreError, StorageError
from storage.registry import read_checkpoints
from storage.report import gather
from storage.samples import ingest_samples
from storage.scores import read_dda_state
from storage.store import LineageStore, where_equal
from storage.vectors import read_embeddings, write_embeddings
from tests.storage.helpers import SAMPLES, SETTINGS, lineage_world, random_vectors, sample_rows


def _rows(store: LineageStore, table: str, drop: tuple[str, ...] = ()) -> list[dict]:
    rows = [{k: v for k, v in r.items() if k not in drop} for r in store.read(table).to_pylist()]
    return sorted(rows, key=lambda r: tuple(str(v) for v in r.values()))


def _append(store: LineageStore, table: str, rows: pa.Table) -> None:
    """Append rows as a writer without the lock could: no merge on the natural key."""
    store.table(table).add(rows)


@pytest.fixture
def damaged(tmp_path):
    store, *_ = lineage_world(tmp_path / "store")
    write_embeddings(store, "base", SAMPLES, random_vectors(len(SAMPLES)), np.zeros(12), np.ones(12))
    clean = {t: _rows(store, t) for t in ("samples", "embeddings", "scores", "checkpoints")}
    _append(store, "samples", store.read("samples", where="sample_id IN ('s001', 's002')"))
    _append(store, "embeddings", store.read("embeddings", where="sample_id = 's003'"))
    _append(store, "checkpoints", store.read("checkpoints", where="checkpoint_id = 'c1'"))
    _append(store, "scores", store.read("scores", where="query_id = 'q1' AND checkpoint_id = 'c2'"))
    state = store.read("dda_state", where=where_equal(query_id="q2"))
    changed = state.set_column(state.schema.get_field_index("weighted_sum"), "weighted_sum",
                               pa.array(np.zeros(state.num_rows)))  # fmt: skip
    _append(store, "dda_state", changed)  # a second fold of q2 that saw other checkpoints
    return store, clean


def test_reads_of_a_damaged_store_fail_naming_the_table_and_the_fix(damaged):
    store, _ = damaged
    with pytest.raises(DamagedStoreError, match=r"table embeddings at checkpoint base holds 2 rows for key 's003'"):
        read_embeddings(store, "base")
    with pytest.raises(DamagedStoreError, match=r"dda_state of query q2 .*dda doctor --repair"):
        read_dda_state(store, SETTINGS, "q2")
    with pytest.raises(DamagedStoreError, match="table samples"):
        ingest_samples(store, sample_rows(3), dataset="toy")
    with pytest.raises(DamagedStoreError, match="table checkpoints holds 2 rows for key 'c1'"):
        read_checkpoints(store)
    assert read_dda_state(store, SETTINGS, "q1") is not None


def test_doctor_finds_every_duplicate_and_repair_restores_the_clean_rows(damaged):
    store, clean = damaged
    found = {d.table: (d.n_keys, d.n_surplus) for d in find_duplicates(store)}
    assert found == {
        "samples": (2, 2), "checkpoints": (1, 1), "embeddings": (1, 1), "scores": (1, 1), "dda_state": (1, 1)
    }  # fmt: skip
    lines = repair(store)
    assert len(lines) == 5
    assert find_duplicates(store) == []
    for table, rows in clean.items():
        assert _rows(store, table) == rows, table
    assert read_dda_state(store, SETTINGS, "q2") is None  # rebuilt by the next refresh
    assert read_dda_state(store, SETTINGS, "q1") is not None


def test_doctor_command_reports_then_repairs(damaged, capsys):
    store, _ = damaged
    data_dir = str(store.root.parent)
    assert main(["doctor", "--data-dir", data_dir]) == 1
    out = capsys.readouterr().out
    assert "embeddings: 1 keys held by several rows (1 surplus)" in out
    assert main(["doctor", "--repair", "--data-dir", data_dir]) == 0
    assert "repaired dda_state: deleted the running state of 1 queries (q2)" in capsys.readouterr().out
    assert main(["doctor", "--data-dir", data_dir]) == 0
    assert "one row per natural key" in capsys.readouterr().out


def test_the_report_refuses_a_damaged_running_state(damaged):
    store, _ = damaged
    with pytest.raises(StorageError, match=r"dda_state holds 2 rows for query 'q2'.*dda doctor --repair"):
        gather(store, SETTINGS)
    repair(store)
    assert [s.query["query_id"] for s in gather(store, SETTINGS).queries] == ["q1"]  # q2 waits for its rebuild
