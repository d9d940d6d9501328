"""Crash safety, proven: `dda index` and `dda attribute` SIGKILLed at named points, re-run, then every table is
compared, row by row and value by value, with an uninterrupted run; two concurrent writers through the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from storage.sql import query
from storage.store import LineageStore
from tests.tasks.helpers import write_queries

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
# Batches of one sample: a resumed run embeds each sample exactly as the clean run did (no padding change).
ENV = {"DDA_INDEXING__BATCH_SIZE": "1", "DDA_INDEXING__SHARD_SIZE": "8", "DDA_PROJECTION__K_IN": "4",
       "DDA_PROJECTION__K_OUT": "4", "DDA_INDEXING__PROGRESS": "false"}  # fmt: skip
TIMESTAMPS = ("ingested_at", "indexed_at", "created_at", "written_at", "updated_at", "derived_at")
TABLES = (
    "samples", "checkpoints", "queries", "derived_corrections", "embeddings", "query_embeddings", "scores", "dda_state",
)  # fmt: skip


def snapshot(data_dir: Path) -> dict[str, list[dict]]:
    """Every table's rows without wall-clock timestamps, sorted; ``runs`` as its (flow, status) pairs."""
    store = LineageStore.open(data_dir / "store")
    out = {}
    for name in TABLES:
        rows = [{k: v for k, v in r.items() if k not in TIMESTAMPS} for r in store.read(name).to_pylist()]
        out[name] = sorted(rows, key=lambda r: tuple(str(v) for v in r.values()))
    out["runs"] = sorted((r["flow_name"], r["status"]) for r in store.read("runs").to_pylist())
    return out


def cli(data_dir: Path, world, *args: str) -> None:
    code = main([*args, "--quiet", "--data-dir", str(data_dir), "--base", world.base_model])
    assert code == 0


def index_args(world) -> tuple[str, ...]:
    return ("index", "--run", world.run_dir, "--run-id", "run")


def subprocess_cli(data_dir: Path, home: Path, world, *args: str, **env: str) -> subprocess.Popen[str]:
    """The real ``dda`` CLI in its own process group (it and its temporary Prefect server); output to files
    under ``home`` (a pipe would stay open as long as the server that a killed CLI leaves behind)."""
    full = {**os.environ, **ENV, "PREFECT_HOME": str(home), **env}
    for key in ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL"):
        full.pop(key, None)
    home.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "flows.cli", *args, "--quiet", "--data-dir", str(data_dir), "--base", world.base_model]
    with (home / "out.log").open("w") as out, (home / "err.log").open("w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=out, stderr=err, text=True, start_new_session=True)


def finish(proc: subprocess.Popen[str], home: Path) -> str:
    """Wait for the CLI, stop what it left in its process group, return the end of its stderr."""
    proc.wait(timeout=300)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return (home / "err.log").read_text()[-2000:]


def killed_at(data_dir: Path, home: Path, world, point: str, *args: str) -> None:
    proc = subprocess_cli(data_dir, home, world, *args, DDA_CRASH_AT=point)
    err = finish(proc, home)
    assert proc.returncode == -signal.SIGKILL, f"{point} was never reached: {err}"


@pytest.fixture(scope="module")
def clean(small_world, tmp_path_factory):
    """An uninterrupted ingest → index → attribute, and its tables."""
    mp = pytest.MonkeyPatch()
    for k, v in ENV.items():
        mp.setenv(k, v)
    root = tmp_path_factory.mktemp("clean")
    queries = write_queries(root / "queries.jsonl", n=3)
    assert main(["ingest", small_world.train_file, "--dataset", "train", "--data-dir", str(root / "data")]) == 0
    cli(root / "data", small_world, *index_args(small_world))
    cli(root / "data", small_world, "attribute", str(queries))
    yield snapshot(root / "data"), queries
    mp.undo()


@pytest.mark.parametrize(
    ("command", "point"),
    [
        ("index", "embedding-written#3"),  # during embedding (the base model's third shard)
        ("index", "before-checkpoint-row#2"),  # checkpoint 1 embedded and finalized, its row not yet written
        ("attribute", "scores-written#1"),  # the base's and the first checkpoint's scores written, no state yet
        ("attribute", "scores-written#2"),  # two checkpoints' scores written, the third's not, no state
        ("attribute", "state-written#1"),  # every state written, the run not recorded: nothing may fold twice
    ],
)
def test_sigkill_then_rerun_leaves_every_table_identical_to_a_clean_run(
    small_world, clean, tmp_path, monkeypatch, command, point
):
    expected, queries = clean
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    data = tmp_path / "data"
    assert main(["ingest", small_world.train_file, "--dataset", "train", "--data-dir", str(data)]) == 0
    if command == "index":
        killed_at(data, tmp_path / "home", small_world, point, *index_args(small_world))
    else:
        cli(data, small_world, *index_args(small_world))
        killed_at(data, tmp_path / "home", small_world, point, "attribute", str(queries))
    partial = snapshot(data)
    assert partial != expected  # the kill left work undone
    if command == "index":
        cli(data, small_world, *index_args(small_world))
    cli(data, small_world, "attribute", str(queries))
    got = snapshot(data)
    for name in (*TABLES, "runs"):
        assert got[name] == expected[name], f"{name} differs after a kill at {point}"


def live_children(pid: int) -> list[int]:
    """Processes (not zombies) whose parent is ``pid``, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def test_sigterm_stops_the_cli_with_its_prefect_server_and_a_rerun_completes(small_world, clean, tmp_path, monkeypatch):
    """``kill`` (a service manager stopping ``dda watch``) ends the CLI like Ctrl-C: its temporary Prefect server is
    stopped with it, not left running, and the same command run again finishes the work."""
    expected, _ = clean
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    data, home = tmp_path / "data", tmp_path / "home"
    assert main(["ingest", small_world.train_file, "--dataset", "train", "--data-dir", str(data)]) == 0
    proc = subprocess_cli(data, home, small_world, *index_args(small_world), DDA_PAUSE_AT="embedding-written:20")
    try:
        deadline = time.monotonic() + 180
        while LineageStore.open(data / "store").read("embeddings", ["sample_id"]).num_rows == 0:
            assert proc.poll() is None, (home / "err.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no embedding written in 180 s"
            time.sleep(0.5)
        servers = live_children(proc.pid)
        assert servers, "the CLI runs no temporary Prefect server"
        proc.send_signal(signal.SIGTERM)  # the shards in flight (paused 20 s) end first, the others are cancelled
        proc.wait(timeout=120)
        time.sleep(1)
        assert [pid for pid in servers if alive(pid)] == [], "the Prefect server outlived the CLI"
        err = (home / "err.log").read_text()
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert "dda index: stopped by signal 15" in err
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    cli(data, small_world, *index_args(small_world))
    assert snapshot(data)["embeddings"] == expected["embeddings"]


def test_two_concurrent_ingests_of_one_file_register_each_sample_once(tmp_path):
    data, n = tmp_path / "data", 2000
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": f"document {i}", "response": f"summary {i}"}) + "\n" for i in range(n))
    )
    cmd = [sys.executable, "-m", "flows.cli", "ingest", str(train), "--data-dir", str(data)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    said = sorted(out.splitlines()[0] for out, _ in outs)
    assert said == [
        f"ingested 0 new samples, {n} already registered",
        f"ingested {n} new samples, 0 already registered",
    ]
    ids = LineageStore.open(data / "store").read("samples", ["sample_id"])["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == n


def test_two_concurrent_attributes_give_one_lineage_row_per_sample(small_world, tmp_path, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    data = tmp_path / "data"
    assert main(["ingest", small_world.train_file, "--data-dir", str(data)]) == 0
    cli(data, small_world, *index_args(small_world))
    first = write_queries(tmp_path / "a.jsonl", n=3)  # q0 q1 q2
    second = tmp_path / "b.jsonl"
    shutil.copy(first, second)  # the same outputs flagged by a second user, plus one more
    extra = write_queries(tmp_path / "c.jsonl", n=4).read_text().splitlines()[-1]
    second.write_text(second.read_text() + extra + "\n")
    homes = [tmp_path / "home-a", tmp_path / "home-b"]
    # Each run pauses 3 s after every checkpoint's scores (3 per run), so without the lock the two would overlap.
    procs = [
        subprocess_cli(data, h, small_world, "attribute", str(f), DDA_PAUSE_AT="scores-written:3")
        for h, f in zip(homes, (first, second), strict=True)
    ]
    for p, home in zip(procs, homes, strict=True):
        err = finish(p, home)
        assert p.returncode == 0, err
    store = LineageStore.open(data / "store")
    rows = query(
        store,
        "SELECT query_id, count(*) AS n, count(DISTINCT sample_id) AS d, min(rank) AS lo, max(rank) AS hi, "
        "count(DISTINCT rank) AS r FROM lineage GROUP BY query_id ORDER BY query_id",
    )
    n = small_world.n_train
    assert [(r["query_id"], r["n"], r["d"], r["lo"], r["hi"], r["r"]) for r in rows.to_pylist()] == [
        (q, n, n, 1, n, n) for q in ("q0", "q1", "q2", "q3")
    ]
    runs = sorted((r["started_at"], r["finished_at"]) for r in store.read("runs").to_pylist()
                  if r["flow_name"] == "dda-attribute")  # fmt: skip
    assert len(runs) == 2
    assert runs[0][1] <= runs[1][0], f"the two attribute runs overlapped: {runs}"  # one writer at a time
