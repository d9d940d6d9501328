"""The writer lock and the audit trail of a run, without Prefect: every command or flow that writes uses these.

A flow records its Prefect flow-run id; a command run without a Prefect server (``dda attribute`` when no
``PREFECT_API_URL`` is set) records a fresh id under the same flow name, so the ``runs`` table is the
audit trail either way. The same run id is the OpenLineage run id of :func:`observed`.
"""

from __future__ import annotations

import json
import os
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


def openlineage_configured() -> bool:
    """Whether the OpenLineage client has a destination by its own conventions, and is not disabled:
    ``OPENLINEAGE_URL``, ``OPENLINEAGE_CONFIG``, ``OPENLINEAGE__TRANSPORT__TYPE`` (and the other
    ``OPENLINEAGE__TRANSPORT__…`` variables), or an ``openlineage.yml``
    in the working folder or ``~/.openlineage``; ``OPENLINEAGE_DISABLED=true`` wins."""
    if os.environ.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OPENLINEAGE_URL") or os.environ.get("OPENLINEAGE_CONFIG"):
        return True
    if os.environ.get("OPENLINEAGE__TRANSPORT__TYPE"):  # what the client needs of its variables (a type)
        return True
    return any(p.is_file() for p in (Path.cwd() / "openlineage.yml", Path.home() / ".openlineage" / "openlineage.yml"))


@contextmanager
def observed(settings: DDASettings, job: str, run_id: str, wrote: dict[str, Any]) -> Iterator[None]:
    """OpenLineage run events around the ``with`` block (:mod:`flows.openlineage_runs`) when configured; else
    nothing (and the client is not imported)."""
    if not openlineage_configured():
        yield
        return
    from flows.openlineage_runs import run_events

    with run_events(settings, job, run_id, wrote):
        yield


@contextmanager
def recorded(settings: DDASettings, flow_name: str, run_id: str, wrote: dict[str, Any]) -> Iterator[None]:
    """Record the ``with`` block as run ``run_id`` of ``flow_name`` in the ``runs`` table: status (completed,
    failed or interrupted), settings, code version and ``wrote`` (filled by the block); with OpenLineage events
    (:func:`observed`)."""
    started = utcnow()
    status = "failed"
    try:
        with observed(settings, flow_name, run_id, wrote):
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
