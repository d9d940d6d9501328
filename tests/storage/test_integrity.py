"""A killed writer leaves a readable store that a re-run completes; concurrent writers lose nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from storage.store import LineageStore
from tests.storage.helpers import open_store

ROOT = Path(__file__).resolve().parents[2]


def writer(root: Path, prefix: str, n_batches: int, batch: int, *flags: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tests.storage.writer", str(root), prefix, str(n_batches), str(batch), *flags]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def keys(root: Path) -> list[str]:
    return LineageStore.open(root).read("embeddings", ["sample_id"])["sample_id"].to_pylist()


def test_killed_writer_leaves_a_readable_store_and_rerun_completes_it(tmp_path):
    open_store(tmp_path)
    proc = writer(tmp_path, "a", 40, 50)
    assert proc.stdout is not None
    for _ in range(3):
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = keys(tmp_path)
    assert len(partial) % 50 == 0
    assert 150 <= len(partial) < 2000
    rerun = writer(tmp_path, "a", 40, 50)
    rerun.communicate(timeout=240)
    assert rerun.returncode == 0
    final = keys(tmp_path)
    assert len(final) == len(set(final)) == 2000


def test_two_concurrent_writers_of_the_same_keys_duplicate_nothing(tmp_path):
    open_store(tmp_path)
    # Measured without the writer lock (``--no-lock``): 1 660 rows for 1 200 keys.
    procs = [writer(tmp_path, "x", 60, 20) for _ in range(2)]
    for p in procs:
        p.communicate(timeout=240)
        assert p.returncode == 0
    final = keys(tmp_path)
    assert len(final) == len(set(final)) == 1200
