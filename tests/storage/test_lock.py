"""The data folder's writer lock: one holder at a time across processes, named on timeout, freed by a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextvars import copy_context
from pathlib import Path

import pytest

from storage.lock import StoreLockedError, holds_lock, writer_lock

ROOT = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys, time\n"
    "from storage.lock import writer_lock\n"
    "with writer_lock(sys.argv[1], 'holder-under-test', 0):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def holder(data_dir: Path) -> subprocess.Popen[str]:
    """A process that takes the lock of ``data_dir``, says ``held`` and sleeps."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(data_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_times_out_naming_the_holder(tmp_path):
    proc = holder(tmp_path)
    try:
        waited: list[object] = []
        start = time.monotonic()
        with pytest.raises(StoreLockedError) as info, writer_lock(tmp_path, "second", 0.5, on_wait=waited.append):
            pytest.fail("the lock was taken while another process held it")
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
    message = str(info.value)
    assert f"pid {proc.pid}" in message
    assert "holder-under-test" in message
    assert "DDA_LOCK_TIMEOUT_SECONDS" in message
    assert len(message.splitlines()) == 1
    assert 0.5 <= elapsed < 10
    assert len(waited) == 1


def test_lock_of_a_killed_process_is_recovered_at_once(tmp_path):
    proc = holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with writer_lock(tmp_path, "after-kill", 0):
        assert holds_lock(tmp_path)
    assert not holds_lock(tmp_path)


def test_waiting_writer_gets_the_lock_when_the_holder_finishes(tmp_path):
    proc = holder(tmp_path)
    subprocess.Popen(["sh", "-c", f"sleep 1; kill {proc.pid}"])
    with writer_lock(tmp_path, "waiter", 30):
        assert proc.wait(timeout=30) != 0


def test_lock_is_reentrant_within_a_process(tmp_path):
    with writer_lock(tmp_path, "outer", 0), writer_lock(tmp_path, "inner", 0):
        assert holds_lock(tmp_path)
    assert not holds_lock(tmp_path)


def test_two_threads_of_one_process_never_hold_the_lock_at_once(tmp_path):
    """Two writers started from threads of one process (a notebook, a server) exclude each other like two
    processes: their holding intervals never overlap, and the second one waits for the first."""
    intervals: list[tuple[float, float]] = []
    first_holds = threading.Event()

    def write(name: str) -> None:
        if name != "writer-0":
            first_holds.wait(timeout=30)  # the second writer asks while the first one holds the lock
        with writer_lock(tmp_path, name, 30):
            first_holds.set()
            begin = time.monotonic()
            time.sleep(0.3)
            intervals.append((begin, time.monotonic()))

    threads = [threading.Thread(target=write, args=(f"writer-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(intervals) == 2
    (_, a1), (b0, _) = sorted(intervals)
    assert a1 <= b0, f"two threads held the lock at once: {intervals}"


def test_another_thread_times_out_while_the_holder_thread_holds_it(tmp_path):
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with writer_lock(tmp_path, "second-thread", 0.3):
                pass
        except StoreLockedError as e:
            errors.append(e)

    with writer_lock(tmp_path, "first-thread", 0):
        t = threading.Thread(target=second)
        t.start()
        t.join(timeout=30)
    assert len(errors) == 1
    assert f"pid {os.getpid()} (first-thread" in str(errors[0])


def test_a_thread_running_in_the_holders_context_re_enters(tmp_path):
    """Work the holding flow hands to its task runner's threads runs in a copy of its context: no wait."""
    seen: list[bool] = []
    with writer_lock(tmp_path, "flow", 0):
        context = copy_context()

        def task() -> None:
            with writer_lock(tmp_path, "task", 0):
                seen.append(holds_lock(tmp_path))

        t = threading.Thread(target=context.run, args=(task,))
        t.start()
        t.join(timeout=30)
    assert seen == [True]


def test_cli_writer_fails_naming_the_holder_while_a_reader_does_not_wait(tmp_path):
    """Through the real CLI: `dda ingest` waits DDA_LOCK_TIMEOUT_SECONDS then fails in one line naming the
    holder, nothing ingested; `dda sql` on the same folder answers while the lock is held."""
    data = tmp_path / "data"
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "p", "response": "r"}\n')
    env = {**os.environ, "DDA_LOCK_TIMEOUT_SECONDS": "1"}
    ingest = [sys.executable, "-m", "flows.cli", "ingest", str(train), "--data-dir", str(data)]
    assert subprocess.run(ingest, cwd=ROOT, env=env, capture_output=True, timeout=120).returncode == 0
    proc = holder(data)
    try:
        again = subprocess.run(ingest, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        sql = [sys.executable, "-m", "flows.cli", "sql", "SELECT count(*) AS n FROM samples", "--data-dir", str(data)]
        read = subprocess.run(sql, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert again.returncode == 2
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("dda ingest: error: data folder")
    assert f"pid {proc.pid} (holder-under-test" in last
    assert "since 20" in last
    assert read.returncode == 0, read.stderr
    assert "1 row" in read.stdout
