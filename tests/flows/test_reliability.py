"""Reliability of the flows and the CLI: kills, corrupt or foreign checkpoints, malformed rows, long queries."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from storage.store import LineageStore
from tasks.models import tiny_llama
from tests.storage.helpers import lineage_world
from tests.tasks.helpers import copy_run, write_queries

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("prefect_server")


def cli(*args: str) -> int:
    return main(list(args))


def table(data_dir: Path, name: str, drop: tuple[str, ...] = ()) -> list[dict]:
    rows = LineageStore.open(data_dir / "store").read(name).to_pylist()
    rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    return sorted(rows, key=lambda r: tuple(str(v) for v in r.values()))


def _age(folder: Path, seconds: float = 3600) -> None:
    old = time.time() - seconds
    for p in [folder, *folder.iterdir()]:
        os.utime(p, (old, old))


def _process(home: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """The real ``dda`` CLI in a fresh process (its own temporary Prefect server under ``home``)."""
    full = {**os.environ, "PREFECT_HOME": str(home), **env}
    for key in ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        full.pop(key, None)
    cmd = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _index_process(data_dir: Path, world, run: Path, home: Path) -> subprocess.Popen[str]:
    return _process(
        home, "index", "--quiet", "--data-dir", str(data_dir), "--base", world.base_model, "--run", str(run),
        "--run-id", "run", DDA_INDEXING__BATCH_SIZE="1", DDA_INDEXING__SHARD_SIZE="4", DDA_PROJECTION__K_IN="4",
        DDA_PROJECTION__K_OUT="4",
    )  # fmt: skip


def _embedded(data_dir: Path) -> int:
    store_dir = data_dir / "store"
    if not (store_dir / "lance" / "embeddings.lance").exists():
        return 0
    try:
        return LineageStore.open(store_dir).read("embeddings", ["sample_id"]).num_rows
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_index_killed_midway_and_rerun_leaves_identical_tables(small_world, tmp_path):
    run = copy_run(small_world, tmp_path / "run")
    for name in ("killed", "clean"):
        (tmp_path / name).mkdir()
        copy = tmp_path / name / "train.jsonl"
        shutil.copy(small_world.train_file, copy)
        assert cli("ingest", str(copy), "--dataset", "train", "--data-dir", str(tmp_path / name)) == 0
    total = 3 * small_world.n_train
    proc = _index_process(tmp_path / "killed", small_world, run, tmp_path / "home-a")
    deadline = time.time() + 300  # early exit: a slow start (a Prefect server) must not end the wait
    while _embedded(tmp_path / "killed") < 12 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the temporary Prefect server it started
    proc.wait()
    partial = _embedded(tmp_path / "killed")
    assert 0 < partial < total, f"the kill landed outside the indexing ({partial} of {total} embedded)"
    for name in ("killed", "clean"):
        done = _index_process(tmp_path / name, small_world, run, tmp_path / f"home-{name}")
        _, err = done.communicate(timeout=240)
        assert done.returncode == 0, err[-2000:]
    for name, drop in (("embeddings", ()), ("checkpoints", ("indexed_at",)), ("samples", ("ingested_at",))):
        killed, clean = table(tmp_path / "killed", name, drop), table(tmp_path / "clean", name, drop)
        assert killed == clean, name
    keys = [(r["sample_id"], r["checkpoint_id"]) for r in table(tmp_path / "killed", "embeddings")]
    assert len(keys) == len(set(keys)) == total


@pytest.mark.slow
def test_watcher_reports_bad_checkpoints_by_name_and_indexes_the_others(small_world, tmp_path):
    run = copy_run(small_world, tmp_path / "run")
    first = sorted(run.iterdir())[0]
    corrupt = run / "checkpoint-9001"
    shutil.copytree(first, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    _age(corrupt)
    foreign = run / "checkpoint-9002"
    tiny_llama(50, hidden=32, layers=2, heads=4).save_pretrained(foreign)
    _age(foreign)
    writing = run / "checkpoint-9003"
    shutil.copytree(first, writing)
    data = (writing / "model.safetensors").read_bytes()
    (writing / "model.safetensors").write_bytes(data[: len(data) // 2])
    data_dir = tmp_path / "data"
    assert cli("ingest", small_world.train_file, "--data-dir", str(data_dir)) == 0
    # The settle window outlasts the CLI's start (a Prefect server: 30 s and more on a loaded machine), so the
    # half-written checkpoint is still young when the watcher looks; the corrupt ones are aged past it.
    proc = _process(
        tmp_path / "home", "watch", "--once", "--quiet", "--data-dir", str(data_dir), "--base",
        small_world.base_model, "--run", str(run), "--run-id", "run", DDA_INDEXING__SETTLE_SECONDS="1800",
    )  # fmt: skip
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err[-3000:]
    assert len(err.strip().splitlines()) == 1, err[-3000:]
    assert "checkpoint-9001" in err
    assert "checkpoint-9002" in err
    assert "9003" not in err
    assert "not a fine-tune of the base model" in err
    assert "pending (still being written)" in out
    assert "checkpoint-9003" in out
    indexed = [r["checkpoint_id"] for r in table(data_dir, "checkpoints")]
    assert sorted(indexed) == sorted(["base"] + [f"run/{p.name}" for p in Path(small_world.run_dir).iterdir()])


def test_malformed_rows_are_listed_by_line_and_nothing_is_ingested(tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n{"prompt": "c", "response": "d"}\nnot json\n')
    code = cli("ingest", str(bad), "--data-dir", str(tmp_path / "data"))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "line 2" in err
    assert "line 4" in err
    assert "nothing ingested" in err
    assert LineageStore.open(tmp_path / "data" / "store").read("samples").num_rows == 0


@pytest.mark.slow
def test_too_long_query_is_reported_and_nothing_registered(small_world, tmp_path, capsys):
    data_dir = tmp_path / "data"
    assert cli("ingest", small_world.train_file, "--data-dir", str(data_dir)) == 0
    args = ("--data-dir", str(data_dir), "--base", small_world.base_model, "--quiet")
    assert cli("index", *args, "--run", small_world.run_dir, "--run-id", "run") == 0
    capsys.readouterr()
    queries = write_queries(tmp_path / "queries.jsonl", n=3, too_long=True)
    assert cli("attribute", str(queries), *args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # in-process, Prefect's own logs come first
    assert "query 'q2' has" in err
    assert "more than the maximum of 64" in err
    assert LineageStore.open(data_dir / "store").read("queries").num_rows == 0


def test_sql_refuses_writes_with_one_line(tmp_path, capsys):
    lineage_world(tmp_path / "store")
    code = cli("sql", "DROP TABLE samples", "--data-dir", str(tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "only SELECT" in err


def test_sql_on_a_folder_without_a_store_fails_and_creates_nothing(tmp_path):
    """Through the real CLI with a user's environment (no PREFECT_HOME): not even Prefect's home is made."""
    folder = tmp_path / "nothing-here"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DDA_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "sql", "SELECT 1", "--data-dir", str(folder)],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "holds no lineage store" in proc.stderr
    assert not folder.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sql_cli_renders_every_type_caps_rows_and_types_named_parameters(tmp_path, capsys):
    lineage_world(tmp_path / "store")
    data = ("--data-dir", str(tmp_path))
    assert cli("sql", "SELECT * FROM test_all_types()", *data, "--format", "json") == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert cli("sql", "SELECT * FROM range(1000000) a, range(1000000) b", *data, "--max-rows", "5") == 0
    captured = capsys.readouterr()
    assert "(5 rows)" in captured.out
    assert "only the first 5 rows" in captured.err
    assert cli("sql", "SELECT count(*) FROM range(100000000000)", *data, "--timeout", "1") == 2
    assert "timeout" in capsys.readouterr().err
    named = ("sql", "sample_history", "--named", "--param", "query_id=q1", *data)
    assert cli(*named, "--param", "sample_id=123", "--format", "csv") == 0  # a digit string stays a str id
    assert capsys.readouterr().out.startswith("step,")
    assert cli("sql", "top_sources", "--named", "--param", "query_id=q1", "--param", "k=ten", *data) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "k='ten' is not a int" in err


@pytest.mark.parametrize(
    "args",
    [
        ["sql", "SELECT count(*) AS n FROM lineage"],
        ["sql", "top_sources", "--named", "--param", "query_id=q1", "--param", "k=3"],
        ["report", "--settings-fingerprint", "settings-a", "--top-k", "3"],
        ["settings"],
        ["--help"],
    ],
    ids=["sql", "sql-named", "report", "settings", "help"],
)
def test_read_only_commands_import_neither_torch_transformers_nor_prefect(tmp_path, args):
    lineage_world(tmp_path / "store")
    full = [*args, "--data-dir", str(tmp_path), "--quiet"] if args != ["--help"] else args
    probe = (
        "import sys\n"
        "from flows.cli import main\n"
        "try:\n"
        f"    assert main({full!r}) == 0\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'prefect') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert not (tmp_path / "prefect").exists()  # no Prefect home, no server
