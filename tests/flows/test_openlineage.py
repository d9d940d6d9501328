"""OpenLineage run events: START and COMPLETE per index, attribute and report run with the training dataset's
version, the model states and the written Lance tables; the ``ddaLineage`` facet against its published schema;
FAIL for a failed run; the same events over HTTP to a receiver on 127.0.0.1; nothing when not configured."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import jsonschema
import pytest

from flows.pipeline import (
    attribute,
    governance_report,
    index_checkpoint,
    index_run,
    load_settings,
    refresh_lineage,
)
from storage.sql import named_query
from storage.store import LineageStore
from tests.tasks.helpers import copy_run, write_queries

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "openlineage" / "DDALineageRunFacet.json").read_text())
SMALL = {"projection": {"k_in": 4, "k_out": 4}, "indexing": {"progress": False}}


@pytest.fixture(autouse=True)
def _restore_openlineage_environment():
    """The OpenLineage client writes variables of its own into ``os.environ`` (``OPENLINEAGE_URL`` aliased as
    ``OPENLINEAGE__TRANSPORT__TRANSPORTS__…``): put every ``OPENLINEAGE*`` variable back as it was."""
    before = {k: v for k, v in os.environ.items() if k.startswith("OPENLINEAGE")}
    yield
    for k in [k for k in os.environ if k.startswith("OPENLINEAGE")]:
        del os.environ[k]
    os.environ.update(before)


def _file_transport(monkeypatch, path: Path) -> None:
    for k in ("OPENLINEAGE_URL", "OPENLINEAGE_CONFIG", "OPENLINEAGE_DISABLED"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "file")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__LOG_FILE_PATH", str(path))
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__APPEND", "true")


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def traced(small_world, tmp_path_factory, prefect_server):
    """Index (base + 2 checkpoints), attribute 3 outputs and write the report, with the file transport on."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("openlineage")
    log = root / "events.jsonl"
    _file_transport(mp, log)
    data = root / "data"
    settings = {**SMALL, "data_dir": str(data), "base_model": small_world.base_model}
    try:
        from flows.cli import main

        assert main(["ingest", small_world.train_file, "--data-dir", str(data)]) == 0
        index_run(run_dir=small_world.run_dir, run_id="run", settings=settings)
        attribute(queries_file=str(write_queries(root / "q.jsonl", n=3)), settings=settings)
        governance_report(settings=settings)
    finally:
        mp.undo()
    return data, _events(log), load_settings(settings)


def _run(events: list[dict], job: str) -> dict[str, dict]:
    (run_id,) = {e["run"]["runId"] for e in events if e["job"]["name"] == job}
    return {e["eventType"]: e for e in events if e["run"]["runId"] == run_id}


def test_each_run_emits_start_then_complete(traced):
    _, events, _ = traced
    jobs = [(e["job"]["name"], e["eventType"]) for e in events]
    for job in ("dda-index-run", "dda-attribute", "dda-report"):
        assert [t for j, t in jobs if j == job] == ["START", "COMPLETE"], jobs
        assert _run(events, job)["COMPLETE"]["job"]["namespace"] == "dda-lineage"


def test_inputs_are_the_dataset_version_and_the_model_states(traced):
    data, events, _ = traced
    store = LineageStore.open(data / "store")
    hashes = sorted(store.read("samples", ["content_hash"])["content_hash"].to_pylist())
    version = hashlib.md5(",".join(hashes).encode()).hexdigest()  # the report's definition, computed apart
    states = {str(Path(r["path"]).resolve()): r["fingerprint"] for r in store.read("checkpoints").to_pylist()}
    assert len(states) == 3
    done = _run(events, "dda-index-run")["COMPLETE"]
    inputs = {(d["namespace"], d["name"]): d["facets"]["version"]["datasetVersion"] for d in done["inputs"]}
    assert inputs == {("dda-lineage", "datasets/train"): version, **{("file", p): fp for p, fp in states.items()}}


def test_outputs_are_the_written_tables_at_their_lance_versions(traced):
    data, events, _ = traced
    store = LineageStore.open(data / "store")
    done = _run(events, "dda-index-run")["COMPLETE"]
    outputs = {d["name"]: int(d["facets"]["version"]["datasetVersion"]) for d in done["outputs"]}
    lance = data.resolve() / "store" / "lance"
    assert {str(lance / f"{t}.lance") for t in ("embeddings", "checkpoints")} <= set(outputs)
    for table in ("embeddings", "checkpoints"):  # written by the index run only
        assert outputs[str(lance / f"{table}.lance")] == store.db.open_table(table).version
    assert all(d["namespace"] == "file" for d in done["outputs"])
    assert _run(events, "dda-index-run")["START"]["outputs"] == []


def test_attribute_run_carries_the_traced_outputs_and_their_top_sources(traced):
    data, events, settings = traced
    facet = _run(events, "dda-attribute")["COMPLETE"]["run"]["facets"]["ddaLineage"]
    jsonschema.validate(facet, SCHEMA["$defs"]["DDALineageRunFacet"])
    assert facet["_schemaURL"].endswith("docs/openlineage/DDALineageRunFacet.json#/$defs/DDALineageRunFacet")
    assert (ROOT / facet["_schemaURL"].split("/blob/main/")[1].split("#")[0]).is_file()
    assert facet["nOutputs"] == 3
    assert [o["queryId"] for o in facet["outputs"]] == ["q0", "q1", "q2"]
    store = LineageStore.open(data / "store")
    for out in facet["outputs"]:
        rows = named_query(store, "influence_by_source", settings.fingerprint, query_id=out["queryId"])
        expected = rows.to_pylist()[:3]
        assert [t["source"] for t in out["topSources"]] == [r["source"] for r in expected]
        assert [t["share"] for t in out["topSources"]] == pytest.approx([r["share"] for r in expected])
    bad = {**facet, "outputs": [{"queryId": "q0", "topSources": [{"source": "a"}]}]}
    with pytest.raises(jsonschema.ValidationError):  # the schema is not a rubber stamp
        jsonschema.validate(bad, SCHEMA["$defs"]["DDALineageRunFacet"])


def test_report_run_reads_the_tables_and_writes_its_files(traced):
    _, events, _ = traced
    done = _run(events, "dda-report")["COMPLETE"]
    assert {Path(d["name"]).name for d in done["outputs"]} == {"report.html", "report.md"}
    assert any(d["name"].endswith("dda_state.lance") for d in done["inputs"])


def test_a_failed_run_emits_fail_with_its_error(small_world, tmp_path, monkeypatch, prefect_server):
    log = tmp_path / "events.jsonl"
    _file_transport(monkeypatch, log)
    folder = copy_run(small_world, tmp_path / "run", steps=1) / next(Path(small_world.run_dir).glob("ch*")).name
    (folder / "model.safetensors").write_bytes(b"\0" * 64)  # a corrupt checkpoint
    settings = {**SMALL, "data_dir": str(tmp_path / "data"), "base_model": small_world.base_model}
    with pytest.raises(ValueError, match="safetensors"):
        index_checkpoint(checkpoint_path=str(folder), settings=settings)
    events = _events(log)
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    assert "safetensors" in events[1]["run"]["facets"]["errorMessage"]["message"]


class _Receiver(BaseHTTPRequestHandler):
    got: ClassVar[list[tuple[str, dict]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.got.append((self.path, json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_events_reach_an_http_receiver_at_openlineage_url(traced, monkeypatch):
    data, _, settings = traced
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for k in [k for k in os.environ if k.startswith("OPENLINEAGE")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("OPENLINEAGE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        from flows.cli import main

        args = ["--data-dir", str(data), "--out", str(data / "r2"), "--settings-fingerprint", settings.fingerprint]
        assert main(["report", *args]) == 0
    finally:
        server.shutdown()
    assert [p for p, _ in _Receiver.got] == ["/api/v1/lineage"] * 2
    start, done = (e for _, e in _Receiver.got)
    assert (start["eventType"], done["eventType"]) == ("START", "COMPLETE")
    assert start["run"]["runId"] == done["run"]["runId"]
    assert done["job"]["name"] == "dda-report"
    assert {Path(d["name"]).name for d in done["outputs"]} == {"report.html", "report.md"}


def test_not_configured_means_no_event_and_no_client(small_world, tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLINEAGE")}
    probe = ("import sys; from flows.runs import openlineage_configured as c; print(c(), "
             "'openlineage' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr
    (tmp_path / "openlineage.yml").write_text("transport:\n  type: console\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "False"], out.stderr
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "OPENLINEAGE_DISABLED": "true"}, cwd=tmp_path,
                         capture_output=True, text=True)  # fmt: skip
    assert out.stdout.split() == ["False", "False"], out.stderr
    (tmp_path / "openlineage.yml").unlink()
    leftovers = {"OPENLINEAGE__TRANSPORT__TRANSPORTS__DEFAULT_HTTP__URL": "http://x"}  # no transport type: no client
    out = subprocess.run([sys.executable, "-c", probe], env={**env, **leftovers}, cwd=tmp_path, capture_output=True,
                         text=True)  # fmt: skip
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_a_refresh_lists_each_output_once_under_its_settings(traced, monkeypatch, tmp_path):
    data, _, settings = traced
    base = {**SMALL, "data_dir": str(data), "base_model": settings.base_model}
    attribute(query_ids=["q0", "q1", "q2"], settings={**base, "scoring": {"normalisation": "cosine"}})
    log = tmp_path / "events.jsonl"
    _file_transport(monkeypatch, log)
    refresh_lineage(settings=base)  # the store now holds lineage under two settings fingerprints
    facet = _run(_events(log), "dda-refresh-lineage")["COMPLETE"]["run"]["facets"]["ddaLineage"]
    assert facet["nOutputs"] == 3
    assert [o["queryId"] for o in facet["outputs"]] == ["q0", "q1", "q2"]
