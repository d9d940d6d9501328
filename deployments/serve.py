"""Serve entry points: the interval-scheduled checkpoint watcher, the checkpoint-saved event trigger and the
on-demand flows, in one process.

``python -m deployments.serve`` (or ``dda watch``) registers the deployments with the Prefect server of
``PREFECT_API_URL`` and runs their flow runs until interrupted (Ctrl-C). Settings come from the
environment (``DDA_…``) and are passed to every run as a parameter. ``dda-on-checkpoint`` runs
:func:`flows.pipeline.index_saved_checkpoint` for every ``dda.checkpoint.saved`` event (the Trainer callback of
:mod:`flows.callback`), one run at a time in the order the events came; the watcher stays as the safety net
(``--no-watcher`` leaves it out).
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger

from flows.checkpoint_events import EVENT, RESOURCE_PREFIX, TRIGGER_PARAMETERS
from flows.pipeline import (
    attribute,
    governance_report,
    index_checkpoint,
    index_run,
    index_saved_checkpoint,
    load_settings,
    refresh_lineage,
    task_runner,
    watch_checkpoints,
)

WATCHER = "dda-watcher"
# One watcher pass at a time: a scheduled pass that comes while the previous one still runs is cancelled
# (two passes indexing the same checkpoint at once would race on the same rows).
ONE_PASS_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
ON_CHECKPOINT = "dda-on-checkpoint"
# Every announced checkpoint gets its run at once, with no Prefect concurrency limit: runs take turns on the data
# folder's writer lock, each indexing what the runs before it left. (With a limit of 1 and ENQUEUE, the server
# put a run that lost the slot back to Scheduled, and in the test suite one such run never started again.)
POLL_SECONDS = 1.0  # how often the served process asks the server for runs to start (Prefect's default: 10 s)


def checkpoint_trigger() -> DeploymentEventTrigger:
    """Run the deployment once per ``dda.checkpoint.saved`` event, with the event's checkpoint and run folder."""
    return DeploymentEventTrigger(
        name="on dda.checkpoint.saved", expect={EVENT}, match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
        parameters=dict(TRIGGER_PARAMETERS),
    )  # fmt: skip


def deployments(settings: Any, interval: int, watcher: bool = True) -> list[Any]:
    """The watcher on an interval schedule (unless ``watcher`` is False), the checkpoint-saved trigger and the
    on-demand flows, all with ``settings`` as a parameter.

    Names match ``deployments/prefect.yaml``.
    """
    params = {"settings": settings.model_dump(mode="json")}
    runner = task_runner(settings)
    scheduled = watch_checkpoints.with_options(task_runner=runner).to_deployment(
        WATCHER, interval=interval, parameters=params, concurrency_limit=ONE_PASS_AT_A_TIME
    )
    return [
        *([scheduled] if watcher else []),
        index_saved_checkpoint.with_options(task_runner=runner).to_deployment(
            ON_CHECKPOINT, parameters=params, triggers=[checkpoint_trigger()]
        ),
        index_run.with_options(task_runner=runner).to_deployment("dda-index-run", parameters=params),
        index_checkpoint.with_options(task_runner=runner).to_deployment("dda-index-checkpoint", parameters=params),
        attribute.with_options(task_runner=runner).to_deployment("dda-attribute", parameters=params),
        refresh_lineage.with_options(task_runner=runner).to_deployment("dda-refresh-lineage", parameters=params),
        governance_report.to_deployment("dda-report", parameters=params),
    ]


def serve_watcher(settings: Any, interval: int, watcher: bool = True) -> None:
    """Serve :func:`deployments` until interrupted, asking for runs every :data:`POLL_SECONDS`."""
    serve(*deployments(settings, interval, watcher), query_seconds=POLL_SECONDS)


def main() -> None:
    """``python -m deployments.serve [--interval N]``: serve with the settings of the environment."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--interval", type=int, help="seconds between watcher runs (default: DDA_WATCH_INTERVAL_SECONDS)"
    )
    parser.add_argument(
        "--no-watcher", action="store_true", help="no interval watcher: checkpoints are indexed on their events only"
    )
    args = parser.parse_args()
    settings = load_settings()
    serve_watcher(settings, args.interval or settings.watch_interval_seconds, watcher=not args.no_watcher)


if __name__ == "__main__":
    main()
