"""Outputs to trace through the CLI: bad rows refused at the door, a failing output isolated, ``--all``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from storage.samples import QueryIn, register_queries
from storage.sql import query
from storage.store import LineageStore
from tests.tasks.helpers import write_queries

pytestmark = pytest.mark.usefixtures("prefect_server")
TINY = {"DDA_PROJECTION__K_IN": "4", "DDA_PROJECTION__K_OUT": "4"}


def cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture
def indexed(small_world, tmp_path, monkeypatch):
    """A data folder with the small world's samples, base model and two checkpoints indexed."""
    for key, value in TINY.items():
        monkeypatch.setenv(key, value)
    data_dir = tmp_path / "data"
    assert cli("ingest", small_world.train_file, "--data-dir", str(data_dir), "--quiet") == 0
    args = ("--data-dir", str(data_dir), "--base", small_world.base_model, "--quiet")
    assert cli("index", *args, "--run", small_world.run_dir, "--run-id", "run") == 0
    return data_dir, args


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "", "response": "Alice flew to China ."}, "'prompt' is empty or blank"),
        ({"prompt": "   \n", "response": "Alice flew to China ."}, "'prompt' is empty or blank"),
        ({"prompt": "document : summary :", "response": " "}, "'response' is empty or blank"),
        ({"prompt": "document : summary :", "response": "x", "corrected": "  "}, "'corrected' is blank"),
        ({"prompt": "document : summary :", "response": "x", "corrected": "x"}, "'corrected' equals 'response'"),
    ],
)
def test_a_bad_output_row_is_refused_naming_file_and_line_and_nothing_is_registered(indexed, tmp_path, capsys, row,
                                                                                     problem):  # fmt: skip
    data_dir, args = indexed
    good = {"id": "fine", "prompt": "document : Alice flew to England . summary :", "response": "Alice flew to China ."}
    queries = _rows(tmp_path / "queries.jsonl", [good, row])
    capsys.readouterr()
    assert cli("attribute", str(queries), *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "queries.jsonl" in err[0]
    assert "line 2" in err[0]
    assert problem in err[0]
    assert LineageStore.open(data_dir / "store").read("queries").num_rows == 0


def test_an_id_registered_with_other_text_is_refused_and_keeps_its_lineage(indexed, tmp_path, capsys):
    data_dir, args = indexed
    first = {
        "id": "newx",
        "prompt": "document : Bruno flew to England . summary :",
        "response": "Bruno flew to China .",
    }
    assert cli("attribute", str(_rows(tmp_path / "a.jsonl", [first])), *args) == 0
    changed = {**first, "response": "Bruno flew to Chile ."}
    capsys.readouterr()
    assert cli("attribute", str(_rows(tmp_path / "b.jsonl", [first, changed])), *args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "appears twice with different text" in err  # within one file
    assert cli("attribute", str(_rows(tmp_path / "c.jsonl", [changed])), *args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "c.jsonl line 1" in err
    assert "'newx' is already registered with another response" in err
    assert "new id" in err
    stored = LineageStore.open(data_dir / "store").read("queries").to_pylist()
    assert [(r["query_id"], r["response"]) for r in stored] == [("newx", "Bruno flew to China .")]
    assert cli("attribute", str(_rows(tmp_path / "d.jsonl", [first])), *args) == 0  # the same text again: fine


def test_an_unregistered_query_id_is_refused_and_recorded_nowhere(indexed, capsys):
    data_dir, args = indexed
    capsys.readouterr()
    assert cli("attribute", "--query-id", "nope", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "query 'nope' is not registered" in err[0]
    store = LineageStore.open(data_dir / "store")
    assert query(store, "SELECT count(*) AS n FROM failed_outputs")["n"][0].as_py() == 0


def test_attribute_with_nothing_to_do_is_a_usage_error(indexed, capsys):
    _, args = indexed
    capsys.readouterr()
    assert cli("attribute", *args) == 2
    assert "nothing to attribute" in capsys.readouterr().err
    assert cli("attribute", "--all", "--query-id", "q0", *args) == 2


@pytest.mark.slow
def test_an_output_that_fails_at_run_time_is_isolated_and_never_fails_a_watcher_pass(indexed, small_world, tmp_path,
                                                                                     capsys):  # fmt: skip
    """An output already in the store that cannot be traced (here: longer than the context, registered before the
    check existed) is recorded as failed with its reason; every other output is traced; ``dda attribute`` exits 1
    naming it; a watcher pass afterwards succeeds."""
    data_dir, args = indexed
    store = LineageStore.open(data_dir / "store")
    too_long = " ".join(["document :"] + ["England"] * 200 + ["summary :"])
    register_queries(store, [QueryIn.model_construct(id="bad", prompt=too_long, response="x", corrected=None,
                                                     meta={}, group=None)])  # fmt: skip
    queries = write_queries(tmp_path / "queries.jsonl", n=3)
    capsys.readouterr()
    assert cli("attribute", str(queries), *args) == 0  # the new outputs alone: the bad one is not asked for
    assert cli("attribute", "--all", *args) == 1
    out, err = capsys.readouterr()
    assert "'bad'" not in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("dda attribute: error: 1 output(s) could not be traced")
    assert "bad (" in last
    assert "failed_outputs" in last
    failed = query(store, "SELECT query_id, checkpoint_id, stage, error FROM failed_outputs").to_pylist()
    assert len(failed) == 1
    assert failed[0]["query_id"] == "bad"
    assert failed[0]["checkpoint_id"] == "base"
    assert "more than the maximum" in failed[0]["error"]
    traced = query(store, "SELECT DISTINCT query_id FROM lineage ORDER BY query_id")["query_id"].to_pylist()
    assert traced == ["q0", "q1", "q2"]
    assert cli("index", *args) == 0  # a watcher pass refreshes every registered output: the bad one is isolated
    assert "output bad could not be traced" in capsys.readouterr().out
