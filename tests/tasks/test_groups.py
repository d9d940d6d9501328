"""Query groups (docs/store.md): a set of outputs traced jointly by the mean of their query vectors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from storage.errors import DatasetFormatError, SampleConflictError
from storage.samples import QueryIn, read_rows
from storage.sql import query
from storage.store import LineageStore
from tasks.attribution import attribute_queries
from tasks.config import ScoringConfig
from tests.tasks.helpers import CONFIG, copy_run
from tests.tasks.test_indexing import index

ROWS = [
    {"id": "q0", "prompt": "document : Alice flew from Peru to England on Monday . summary :",
     "response": "Alice flew to China .", "corrected": "Alice flew to England .", "group": "fixed"},
    {"id": "q1", "prompt": "document : Bruno flew from Peru to England on Friday . summary :",
     "response": "Bruno flew to China ."},
    {"id": "q2", "prompt": "document : On Sunday , Chen and Dara arrived in England . summary :",
     "response": "Chen and Dara arrived in China .", "corrected": "Chen and Dara arrived in England .",
     "group": "fixed"},
]  # fmt: skip

# Every step is linear in the query vector here (Fisher preconditioner, no normalisation, λ·s̃_0 debias,
# mean over checkpoints), so a group's lineage must equal the mean of its members' lineage.
LINEAR = dataclasses.replace(
    CONFIG, scoring=ScoringConfig(preconditioner="fisher", normalisation="none", debias_coefficient=0.5)
)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _lineage(store, fp):
    rows = query(store, "SELECT query_id, sample_id, dda_score FROM lineage WHERE settings_fingerprint = $fp "
                 "ORDER BY query_id, sample_id", {"fp": fp}).to_pylist()  # fmt: skip
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["query_id"], []).append(r["dda_score"])
    return {q: np.array(v) for q, v in out.items()}


@pytest.fixture(scope="module")
def grouped(small_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    index(root, small_world, copy_run(small_world, root / "run", steps=2), LINEAR)
    report = attribute_queries(root, small_world.base_model, _write(root / "q.jsonl", ROWS), [], LINEAR, group="rest")
    return root, report


def test_a_group_traces_the_mean_of_its_members(grouped):
    root, report = grouped
    assert report["groups"] == ["group:fixed", "group:rest"]
    store = LineageStore.open(root / "store")
    lineage = _lineage(store, LINEAR.settings_fingerprint)
    # 'fixed': both members corrected, so contrastive like its members; 'rest': q1 alone, plain like q1.
    expected = (lineage["q0"] + lineage["q2"]) / 2  # scores accumulate in float32: bound relative to the largest
    np.testing.assert_allclose(lineage["group:fixed"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(lineage["group:rest"], lineage["q1"], rtol=1e-5, atol=1e-5 * np.abs(lineage["q1"]).max())
    assert np.abs(lineage["group:fixed"]).max() > 0


def test_group_members_are_in_the_query_groups_view(grouped):
    root, _ = grouped
    store = LineageStore.open(root / "store")
    rows = query(store, "SELECT group_id, query_id FROM query_groups ORDER BY group_id, query_id").to_pylist()
    assert [(r["group_id"], r["query_id"]) for r in rows] == [
        ("group:fixed", "q0"),
        ("group:fixed", "q2"),
        ("group:rest", "q1"),
    ]
    group = query(store, "SELECT corrected, meta_json FROM queries WHERE query_id = 'group:fixed'").to_pylist()[0]
    assert group["corrected"] is not None
    assert json.loads(group["meta_json"])["members"] == ["q0", "q2"]


def test_the_same_groups_again_do_nothing_and_other_members_are_refused(grouped, small_world):
    root, _ = grouped
    again = attribute_queries(root, small_world.base_model, _write(root / "again.jsonl", ROWS), [], LINEAR, "rest")
    assert again["folds"] == 0
    changed = [dict(ROWS[0]), {**ROWS[2], "group": None}]
    with pytest.raises(SampleConflictError, match="query group 'fixed' already has 2 other members"):
        attribute_queries(root, small_world.base_model, _write(root / "changed.jsonl", changed), [], LINEAR)


def test_group_ids_are_reserved(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"id": "group:x", "prompt": "p", "response": "r"}])
    with pytest.raises(DatasetFormatError, match="reserved for query groups"):
        read_rows(path, QueryIn)
