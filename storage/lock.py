"""One writer per data folder: an OS file lock (``filelock``) held for a whole command or flow run.

Every command or flow that writes the store takes :func:`writer_lock` on the data folder before its
first write and releases it after its last, including the writes its task runner's threads or Dask
workers make on its behalf (they run while the flow holds the lock and never take it themselves).
A second writer waits up to ``timeout`` seconds, then fails with :class:`StoreLockedError` naming the
holder (pid, command, since when). The lock is an advisory ``flock``: the kernel releases it when the
holding process dies, so a lock left by a killed process is recovered by the next writer without any
clean-up. Readers (SQL, reports) never take it: every Lance read is a consistent snapshot.

The lock belongs to the code that took it, not to its process: it is re-entrant within one execution
context (``dda demo`` runs flows that take it again; a task thread started by the holding flow inherits its
context), while another thread of the same process — a second flow started from a notebook or a server —
waits for it like another process does. Ownership is a :mod:`contextvars` value; each acquisition opens its
own file descriptor, and ``flock`` excludes descriptors of one process from each other.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from storage.errors import StorageError
from storage.store import utcnow

LOCK_FILE = "writer.lock"


class StoreLockedError(StorageError):
    """Another process holds the data folder's writer lock and did not release it within the timeout."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a data folder's writer lock: process id, command and since when (UTC, ISO 8601)."""

    pid: int
    command: str
    since: str

    def describe(self) -> str:
        """``pid 123 (dda index …) since 2026-11-22T10:00:00``."""
        return f"pid {self.pid} ({self.command}) since {self.since}"


_OWNED: ContextVar[frozenset[Path]] = ContextVar("dda_owned_locks", default=frozenset())


def read_holder(holder_file: Path) -> LockHolder | None:
    """The holder recorded in ``holder_file`` by the current (or last) holder of a lock, or None when unknown."""
    try:
        raw = json.loads(holder_file.read_text())
        return LockHolder(int(raw["pid"]), str(raw["command"]), str(raw["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_holder(holder_file: Path, holder: LockHolder) -> None:
    tmp = holder_file.with_name(f".{holder_file.name}.{os.getpid()}")
    tmp.write_text(json.dumps(holder.__dict__))
    os.replace(tmp, holder_file)


def _command_line() -> str:
    text = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv)) if sys.argv else "python"
    return text if len(text) <= 160 else text[:159] + "…"


@contextmanager
def writer_lock(
    data_dir: str | Path, purpose: str, timeout: float, on_wait: Callable[[LockHolder | None], None] | None = None
) -> Iterator[None]:
    """Hold the writer lock of ``data_dir`` (created if needed) for the ``with`` block.

    ``purpose`` names the work for other writers (e.g. ``dda-index-run``); ``timeout`` is how long to
    wait for another holder (0: fail at once). ``on_wait`` is called once with the current holder when
    the lock is not free at once. Raises :class:`StoreLockedError` naming the holder after ``timeout``.
    """
    folder = Path(data_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder / LOCK_FILE, purpose, timeout, on_wait, what=f"data folder {folder}"):
        yield


@contextmanager
def exclusive(
    lock_file: Path, purpose: str, timeout: float, on_wait: Callable[[LockHolder | None], None] | None = None,
    what: str | None = None,
) -> Iterator[None]:  # fmt: skip
    """Hold the OS lock ``lock_file`` (its holder recorded in ``<lock_file>.json``) for the ``with`` block.

    Re-entrant within the execution context that holds it (:data:`_OWNED`); any other thread waits."""
    lock_file = lock_file.resolve()
    holder_file = lock_file.with_name(lock_file.name + ".json")
    owned = _OWNED.get()
    if lock_file in owned:
        yield
        return
    lock = FileLock(lock_file, thread_local=False, is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait(read_holder(holder_file))
        try:
            lock.acquire(timeout=timeout, poll_interval=0.1)
        except Timeout as e:
            holder = read_holder(holder_file)
            who = holder.describe() if holder else "another process"
            raise StoreLockedError(
                f"{what or lock_file} is being written by {who}; waited {timeout:g} s: let it finish, "
                "or raise DDA_LOCK_TIMEOUT_SECONDS"
            ) from e
    token = _OWNED.set(owned | {lock_file})
    try:
        _write_holder(holder_file, LockHolder(os.getpid(), f"{purpose}: {_command_line()}", utcnow().isoformat()))
        yield
    finally:
        _OWNED.reset(token)
        lock.release()


def announce_wait(holder: LockHolder | None) -> None:
    """The ``on_wait`` of commands: one line on stderr saying whose lock this writer waits for."""
    who = holder.describe() if holder else "another process"
    print(f"waiting for the writer lock, held by {who}", file=sys.stderr, flush=True)


def holds_lock(data_dir: str | Path) -> bool:
    """True when the current execution context holds the writer lock of ``data_dir``."""
    return (Path(data_dir).resolve() / LOCK_FILE) in _OWNED.get()
