"""Deployments: every entry point is a Prefect flow; a served watcher indexes a dropped checkpoint on schedule;
the Dask task runner (configuration only) writes the same tables as the default runner."""

from __future__ import annotations

import shutil
import subprocess
from itertools import pairwise
from pathlib import Path

import pytest
import yaml
from prefect import Flow
from prefect.utilities.importtools import import_object

from flows.checkpoint_events import EVENT
from flows.pipeline import load_settings
from storage.store import LineageStore
from tests.flows.servers import BIN, prefect_env, start_serve, stop, tail, wait_for
from tests.tasks.helpers import copy_run

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


def test_every_prefect_yaml_entry_point_imports_to_a_flow():
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    entries = {d["name"]: d["entrypoint"] for d in spec["deployments"]}
    assert "dda-watcher" in entries
    for name, entrypoint in entries.items():
        obj = import_object(str(ROOT / entrypoint.split(":")[0]) + ":" + entrypoint.split(":")[1])
        assert isinstance(obj, Flow), name
    watcher = next(d for d in spec["deployments"] if d["name"] == "dda-watcher")
    assert watcher["schedules"][0]["interval"] > 0


def test_served_deployments_match_prefect_yaml(tmp_path):
    from deployments.serve import deployments

    served = deployments(load_settings(data_dir=str(tmp_path)), interval=30)
    names = {d.name for d in served}
    assert names == {d["name"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    watcher = next(d for d in served if d.name == "dda-watcher")
    assert watcher.schedules[0].schedule.interval.total_seconds() == 30
    declared = next(d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"] if d["name"] == "dda-watcher")
    assert watcher.concurrency_limit == declared["concurrency_limit"]["limit"] == 1
    assert watcher.concurrency_options.collision_strategy.value == declared["concurrency_limit"]["collision_strategy"]
    on_event = next(d for d in served if d.name == "dda-on-checkpoint")
    yaml_event = next(d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"] if d["name"] == on_event.name)
    (trigger,) = on_event.triggers
    (declared_trigger,) = yaml_event["triggers"]
    assert trigger.expect == set(declared_trigger["expect"]) == {EVENT}
    assert trigger.match.model_dump() == declared_trigger["match"]
    assert trigger.parameters == declared_trigger["parameters"]
    # No Prefect concurrency limit on event runs: they take turns on the data folder's writer lock
    assert (on_event.concurrency_limit, on_event.concurrency_options) == (None, None)
    assert "concurrency_limit" not in yaml_event
    assert "dda-watcher" not in {d.name for d in deployments(load_settings(data_dir=str(tmp_path)), 30, watcher=False)}


def _indexed(data_dir: Path) -> set[str]:
    if not (data_dir / "store" / "lance" / "checkpoints.lance").exists():
        return set()
    return set(LineageStore.open(data_dir / "store").read("checkpoints")["checkpoint_id"].to_pylist())


def _completed(data_dir: Path) -> int:
    if not (data_dir / "store" / "lance" / "runs.lance").exists():
        return 0
    return LineageStore.open(data_dir / "store").read("runs")["status"].to_pylist().count("completed")


@pytest.mark.integration
@pytest.mark.slow
def test_served_watcher_indexes_a_dropped_checkpoint_on_schedule(small_world, tmp_path, local_server):
    run = copy_run(small_world, tmp_path / "run", steps=1)
    later = sorted(Path(small_world.run_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[1]
    data_dir = tmp_path / "data"
    ingest = subprocess.run(
        [str(BIN / "dda"), "ingest", small_world.train_file, "--data-dir", str(data_dir)],
        env=prefect_env(local_server, tmp_path / "home"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr
    env = prefect_env(local_server, tmp_path / "home", DDA_DATA_DIR=str(data_dir),
                      DDA_BASE_MODEL=small_world.base_model, DDA_RUN_DIR=str(run), DDA_RUN_ID="run")  # fmt: skip
    log = tmp_path / "serve.log"
    serve = start_serve(env, log, "--interval", "5")
    try:
        first = {"base", f"run/{sorted(run.iterdir())[0].name}"}
        assert wait_for(lambda: _indexed(data_dir) >= first, 150, serve), f"first pass did not index: {tail(log)}"
        shutil.copytree(later, tmp_path / "staging")
        (tmp_path / "staging").rename(run / later.name)
        assert wait_for(lambda: f"run/{later.name}" in _indexed(data_dir), 150, serve), f"not seen: {tail(log)}"
        # One pass at a time: the pass that indexed it finishes (refresh, artifacts) before the server stops.
        assert wait_for(lambda: _completed(data_dir) >= 2, 150, serve), f"second pass not completed: {tail(log)}"
    finally:
        stop(serve)
    runs = LineageStore.open(data_dir / "store").read("runs").to_pylist()
    assert {r["flow_name"] for r in runs} == {"dda-watch-checkpoints"}
    statuses = [r["status"] for r in runs]
    assert statuses.count("completed") >= 2, statuses
    assert set(statuses) <= {"completed", "interrupted"}, [(r["status"], r["wrote_json"]) for r in runs]
    # The watcher deployment runs one pass at a time (a pass due while one runs is cancelled, never started).
    spans = sorted((r["started_at"], r["finished_at"]) for r in runs)
    assert all(later[0] >= earlier[1] for earlier, later in pairwise(spans)), spans


def _table(data_dir: Path, name: str, drop: tuple[str, ...]) -> list[dict]:
    rows = LineageStore.open(data_dir / "store").read(name).to_pylist()
    rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    return sorted(rows, key=lambda r: tuple(str(v) for v in r.values()))


@pytest.mark.integration
@pytest.mark.slow
def test_dask_runner_writes_the_same_tables_as_the_default_runner(small_world, tmp_path, local_server):
    for runner in ("threads", "dask"):
        data_dir = tmp_path / runner
        env = prefect_env(local_server, tmp_path / "home", DDA_RUNNER__KIND=runner, DDA_RUNNER__DASK_WORKERS="2",
                   DDA_INDEXING__SHARD_SIZE="8")  # fmt: skip
        for args in (("ingest", small_world.train_file), ("index", "--base", small_world.base_model, "--run",
                     small_world.run_dir, "--run-id", "run")):  # fmt: skip
            done = subprocess.run([str(BIN / "dda"), *args, "--data-dir", str(data_dir)], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
    for name, drop in (("embeddings", ()), ("checkpoints", ("indexed_at",)), ("samples", ("ingested_at",))):
        assert _table(tmp_path / "threads", name, drop) == _table(tmp_path / "dask", name, drop), name
    assert len(_table(tmp_path / "dask", "embeddings", ())) == 3 * small_world.n_train
