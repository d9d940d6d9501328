"""Lineage on save: the Trainer callback announces each checkpoint as a Prefect event, the served
``dda-on-checkpoint`` deployment indexes it and folds it into every registered output's lineage (no interval
watcher), and a training run goes on when the server is down."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.checkpoint_events import EVENT
from storage.store import LineageStore
from tasks.checkpoints import CheckpointError, wait_until_written
from tests.flows.servers import (
    BIN,
    diagnose,
    free_port,
    prefect_env,
    serving,
    start_serve,
    stop,
    tail,
    trigger_ready,
    wait_for,
)
from tests.flows.train_with_callback import train
from tests.tasks.helpers import copy_run, write_queries

DEPLOYMENT = "dda-index-saved-checkpoint/dda-on-checkpoint"

ROOT = Path(__file__).resolve().parents[2]


def _dda(env: dict[str, str], *args: str) -> None:
    done = subprocess.run([str(BIN / "dda"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _folded(data_dir: Path) -> dict[str, set[str]]:
    """Per registered output, the checkpoints its lineage folded."""
    store = LineageStore.open(data_dir / "store")
    if not store.has_table("dda_state"):
        return {}
    return {r["query_id"]: set(r["checkpoints"]) for r in store.read("dda_state").to_pylist()}


@pytest.mark.integration
@pytest.mark.slow
def test_each_saved_checkpoint_is_indexed_and_folded_on_its_event(small_world, tmp_path, local_server):
    data_dir, run = tmp_path / "data", tmp_path / "run"
    run.mkdir()  # the served runs log at INFO into serve.log: other tests leave PREFECT_LOGGING_LEVEL=CRITICAL behind
    env = prefect_env(local_server, tmp_path / "home", DDA_DATA_DIR=str(data_dir),
                      DDA_BASE_MODEL=small_world.base_model, PYTHONFAULTHANDLER="1",
                      PREFECT_LOGGING_LEVEL="INFO")  # fmt: skip
    _dda(env, "ingest", small_world.train_file)
    _dda(env, "index", "--run", str(run))  # the base model; the run has no checkpoint yet
    _dda(env, "attribute", str(write_queries(tmp_path / "q.jsonl", n=2)))
    log = tmp_path / "serve.log"
    serve = start_serve(env, log, "--no-watcher")
    try:
        ready = lambda: trigger_ready(local_server, EVENT) and serving(local_server, DEPLOYMENT, data_dir)  # noqa: E731
        assert wait_for(ready, 120, serve), f"not served: {tail(log)}"
        times = tmp_path / "times.json"
        trained = subprocess.run(
            [sys.executable, "-m", "tests.flows.train_with_callback", small_world.base_model, small_world.train_file,
             str(run), "--epochs", "2", "--times", str(times)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-3000:]
        saved = json.loads(times.read_text())
        ids = {f"run/checkpoint-{step}" for step, _ in saved["saves"]}
        assert len(ids) == 2
        assert len(saved["announced"]) == 2
        done = wait_for(lambda: all(ids <= c for c in _folded(data_dir).values()), 240, serve)
        assert done, f"lineage did not fold {sorted(ids)}: {_folded(data_dir)}: {diagnose(serve, log, local_server)}"
        # index, attribute, two event runs (they take turns on the writer lock; either may come first)
        recorded = wait_for(lambda: _runs(data_dir).count("completed") >= 4, 120, serve)
        assert recorded, f"runs {_run_rows(data_dir)}: {diagnose(serve, log, local_server)}"
    finally:
        stop(serve)
    runs = LineageStore.open(data_dir / "store").read("runs").to_pylist()
    event_runs = [r for r in runs if r["flow_name"] == "dda-index-saved-checkpoint"]
    assert "dda-watch-checkpoints" not in {r["flow_name"] for r in runs}
    assert [r["status"] for r in event_runs] == ["completed", "completed"]
    indexed = [c for r in event_runs for c in json.loads(r["wrote_json"])["indexed"]]
    assert sorted(indexed) == sorted(ids)  # one run per checkpoint; none indexed twice


def _run_rows(data_dir: Path) -> list[dict]:
    store = LineageStore.open(data_dir / "store")
    return store.read("runs").to_pylist() if store.has_table("runs") else []


def _runs(data_dir: Path) -> list[str]:
    store = LineageStore.open(data_dir / "store")
    return store.read("runs")["status"].to_pylist() if store.has_table("runs") else []


def test_training_goes_on_when_the_server_is_down(small_world, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")  # nothing listens there
    with caplog.at_level("WARNING", logger="dda.callback"):
        out = train(small_world.base_model, small_world.train_file, tmp_path / "run", epochs=2, announce=True)
    assert [s for s, _ in out["saves"]] == sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").iterdir())
    assert len(out["saves"]) == 2
    assert out["announced"] == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "dda.callback"]
    assert len(warnings) == 1  # one line per outage, not one per save
    assert "does not answer" in warnings[0]


def test_without_a_server_the_callback_does_nothing_and_imports_nothing(tmp_path):
    probe = (
        "import sys\nfrom types import SimpleNamespace as N\nfrom flows.callback import LineageCallback\n"
        "cb = LineageCallback()\n"
        "cb.on_save(N(output_dir='run'), N(global_step=3, epoch=1.0, is_world_process_zero=True), N())\n"
        "print(sorted(m for m in ('prefect', 'lancedb', 'duckdb', 'tasks', 'storage') if m in sys.modules))\n"
    )
    env = {k: v for k, v in prefect_env("", tmp_path).items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_an_announced_checkpoint_is_waited_for_while_it_is_written(small_world, tmp_path):
    source = next(Path(small_world.run_dir).glob("checkpoint-*"))
    folder = copy_run(small_world, tmp_path / "run", steps=1) / source.name
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # the Trainer is still writing it

    def finish() -> None:
        time.sleep(1.5)
        weights.write_bytes(whole)

    writer = threading.Thread(target=finish)
    started = time.time()
    writer.start()
    info = wait_until_written(folder, settle_seconds=30, poll_seconds=0.1)
    writer.join()
    assert info.status == "complete"
    assert time.time() - started >= 1.5


def test_an_announced_checkpoint_that_stays_broken_or_missing_fails(small_world, tmp_path):
    folder = copy_run(small_world, tmp_path / "run", steps=1) / next(Path(small_world.run_dir).glob("ch*")).name
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    broken = wait_until_written(folder, settle_seconds=0.5, poll_seconds=0.1)
    assert broken.status == "corrupt"
    assert "safetensors" in str(broken.problem)
    missing = wait_until_written(tmp_path / "run" / "checkpoint-999", settle_seconds=0.3, poll_seconds=0.1)
    assert (missing.status, missing.step) == ("corrupt", 999)
    assert "does not exist" in str(missing.problem)


def test_the_event_names_the_contract_of_flows_checkpoint_events():
    from flows.checkpoint_events import payload, resource

    folder, run = Path("/r/run/checkpoint-7"), Path("/r/run")
    assert resource(folder, run, 7)["prefect.resource.id"] == "dda.checkpoint./r/run/checkpoint-7"
    assert payload(folder, run, 7, 1.0) == {"checkpoint": str(folder), "run_dir": str(run), "step": 7, "epoch": 1.0}
    assert EVENT == "dda.checkpoint.saved"


@pytest.mark.parametrize("name", ["model", "checkpoint-x", ""])
def test_an_announced_folder_that_is_not_a_checkpoint_is_refused(tmp_path, name):
    with pytest.raises(CheckpointError, match="is not a checkpoint-<step> folder"):
        wait_until_written(tmp_path / name if name else Path(name), settle_seconds=0.1)


def test_a_checkpoint_announced_with_another_run_folder_is_refused(small_world, tmp_path, prefect_server):
    from flows.pipeline import index_saved_checkpoint

    folder = copy_run(small_world, tmp_path / "run", steps=1) / next(Path(small_world.run_dir).glob("ch*")).name
    settings = {"data_dir": str(tmp_path / "data"), "base_model": small_world.base_model}
    with pytest.raises(CheckpointError, match="is not in the announced run folder"):
        index_saved_checkpoint(checkpoint_path=str(folder), run_dir=str(tmp_path / "elsewhere"), settings=settings)
    assert not (tmp_path / "data" / "store").exists()  # refused before anything was written


def test_a_run_for_another_data_folder_than_the_served_one_is_refused(small_world, tmp_path, prefect_server,
                                                                     monkeypatch):  # fmt: skip
    """A trigger outlives its serve: an event that came while an earlier serve's trigger was registered carries that
    serve's settings (data folder A), and the serve of folder B would index it into A. Refused, nothing written."""
    from flows.pipeline import index_saved_checkpoint

    folder = copy_run(small_world, tmp_path / "run", steps=1) / next(Path(small_world.run_dir).glob("ch*")).name
    monkeypatch.setenv("DDA_DATA_DIR", str(tmp_path / "b"))
    settings = {"data_dir": str(tmp_path / "a"), "base_model": small_world.base_model}
    with pytest.raises(CheckpointError, match="but this process serves .*b .DDA_DATA_DIR."):
        index_saved_checkpoint(checkpoint_path=str(folder), settings=settings)
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()
