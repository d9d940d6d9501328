"""A Hugging Face ``TrainerCallback`` that announces every saved checkpoint to Prefect, for lineage on save.

One line in a training script::

    from flows.callback import LineageCallback
    trainer = Trainer(..., callbacks=[LineageCallback()])

At each save (main process only) it emits the ``dda.checkpoint.saved`` event of :mod:`flows.checkpoint_events`
to the Prefect server of ``PREFECT_API_URL`` (the environment, or ``api_url=``); the served ``dda-on-checkpoint``
deployment indexes that checkpoint and refreshes lineage. Nothing is indexed inside the training process.

Cost to training: with no server configured the callback does nothing and imports nothing beyond this module.
With one, ``prefect.events`` is imported when the callback is built (before training), and Prefect's events
client is started then if the server answers ``/health`` within :data:`PROBE_TIMEOUT_S`. Each save hands the
event to one background thread, which queues it with that client (probing the server first until it has
answered once). An unreachable server costs a log line, never an exception in the training loop; the interval
watcher (``dda watch``) still finds every checkpoint.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from flows.checkpoint_events import EVENT, checkpoint_folder, payload, resource

log = logging.getLogger("dda.callback")
PROBE_TIMEOUT_S = 1.0
FLUSH_TIMEOUT_S = 10.0


class LineageCallback(TrainerCallback):  # type: ignore[misc]
    """Announce each checkpoint the Trainer saves as a Prefect event (``announced`` lists the folders sent)."""

    def __init__(self, api_url: str | None = None) -> None:
        self.api_url = api_url or os.environ.get("PREFECT_API_URL") or None
        self.announced: list[str] = []
        self._pending: list[Future[None]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._down = False
        self._connected = False
        if self.api_url is None:
            log.info("no Prefect server configured (PREFECT_API_URL): checkpoints are not announced")
            return
        if api_url is not None:
            os.environ.setdefault("PREFECT_API_URL", api_url)  # Prefect's events client reads its settings
        import prefect.events  # noqa: F401  (imported here, before training, not inside a save)

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dda-announce")
        if self._reachable():  # start Prefect's events client now, not during the first save
            from prefect.events.worker import EventsWorker

            EventsWorker.instance()
            self._connected = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After the Trainer wrote ``checkpoint-<global_step>``: queue its announcement (no network call here)."""
        if self._pool is None or not state.is_world_process_zero:
            return
        run_dir = Path(args.output_dir).resolve()
        folder = checkpoint_folder(run_dir, state.global_step)
        self._pending.append(self._pool.submit(self._announce, folder, run_dir, state.global_step, state.epoch))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Let the last announcements reach Prefect's events client (at most :data:`FLUSH_TIMEOUT_S`)."""
        self.flush()

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until every queued announcement was handed to Prefect (or ``timeout`` seconds)."""
        wait(self._pending, timeout=timeout)
        self._pending = [f for f in self._pending if not f.done()]

    def _reachable(self) -> bool:
        """Whether the server answers ``GET <api_url>/health`` within :data:`PROBE_TIMEOUT_S` (any HTTP status)."""
        try:
            with urllib.request.urlopen(f"{str(self.api_url).rstrip('/')}/health", timeout=PROBE_TIMEOUT_S):
                return True
        except urllib.error.HTTPError:
            return True
        except (OSError, ValueError):
            return False

    def _announce(self, folder: Path, run_dir: Path, step: int, epoch: float | None) -> None:
        """Emit the event for one checkpoint (in the background thread); a log line, not an error, when down.

        The server is probed until it first answers, then Prefect's events client keeps its connection (and
        retries on its own): no request per save beyond the event itself.
        """
        if not self._connected and not self._reachable():
            if not self._down:
                log.warning("Prefect server %s does not answer: %s not announced (dda watch still finds it); "
                            "announcing again once it answers", self.api_url, folder.name)  # fmt: skip
            self._down = True
            return
        self._down, self._connected = False, True
        from prefect.events import emit_event

        about = resource(folder, run_dir, step)
        sent = emit_event(EVENT, resource=about, payload=payload(folder, run_dir, step, epoch))
        if sent is not None:
            self.announced.append(str(folder))
