"""The writer lock and the audit trail of a run, without Prefect: every command or flow that writes uses these.

A flow records its Prefect flow-run id; a command run without a Prefect server (``dda attribute`` when no
``PREFECT_API_URL`` is set) records a fresh id under the same flow name, so the ``runs`` table is the
audit trail either way.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.settings import DDASettings, code_version
from storage.lock import announce_wait, writer_lock
from storage.registry import write_run
from storage.store import LineageStore, utcnow


def new_run_id() -> str:
    """A fresh run id for work done outside a Prefect flow run."""
    return str(uuid.uuid4())


@contextmanager
def writing(settings: DDASettings, purpose: str) -> Iterator[None]:
    """Hold the data folder's writer lock (:func:`storage.lock.writer_lock`) for the ``with`` block.

    Waits up to ``settings.lock_timeout_seconds`` for another writer, saying so once on stderr.
    """
    with writer_lock(settings.data_dir, purpose, settings.lock_timeout_seconds, on_wait=announce_wait):
        yield


@contextmanager
def recorded(settings: DDASettings, flow_name: str, run_id: str, wrote: dict[str, Any]) -> Iterator[None]:
    """Record the ``with`` block as run ``run_id`` of ``flow_name`` in the ``runs`` table: status (completed,
    failed or interrupted), settings, code version and ``wrote`` (filled by the block)."""
    started = utcnow()
    status = "failed"
    try:
        yield
        status = "completed"
    except (KeyboardInterrupt, SystemExit):
        status = "interrupted"
        raise
    finally:
        store = LineageStore.open(Path(settings.data_dir) / "store")
        if store.meta is not None:
            write_run(store, {
                "run_id": run_id, "flow_name": flow_name, "started_at": started, "finished_at": utcnow(),
                "status": status, "settings_json": settings.model_dump_json(),
                "settings_fingerprint": settings.fingerprint,
                "projection_fingerprint": store.meta.projection_fingerprint, "code_version": code_version(),
                "wrote_json": json.dumps(wrote, sort_keys=True, default=str),
            })  # fmt: skip
