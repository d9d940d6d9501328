"""Serve entry points: the interval-scheduled checkpoint watcher and the on-demand flows, in one process.

``python -m deployments.serve`` (or ``dda watch``) registers the deployments with the Prefect server of
``PREFECT_API_URL`` and runs their flow runs until interrupted (Ctrl-C). Settings come from the
environment (``DDA_…``) and are passed to every run as a parameter.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.pipeline import (
    attribute,
    governance_report,
    index_checkpoint,
    index_run,
    load_settings,
    refresh_lineage,
    task_runner,
    watch_checkpoints,
)

WATCHER = "dda-watcher"
# One watcher pass at a time: a scheduled pass that comes while the previous one still runs is cancelled
# (two passes indexing the same checkpoint at once would race on the same rows).
ONE_PASS_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def deployments(settings: Any, interval: int) -> list[Any]:
    """The watcher on an interval schedule and the on-demand flows, all with ``settings`` as a parameter.

    Names match ``deployments/prefect.yaml``.
    """
    params = {"settings": settings.model_dump(mode="json")}
    runner = task_runner(settings)
    return [
        watch_checkpoints.with_options(task_runner=runner).to_deployment(
            WATCHER, interval=interval, parameters=params, concurrency_limit=ONE_PASS_AT_A_TIME
        ),
        index_run.with_options(task_runner=runner).to_deployment("dda-index-run", parameters=params),
        index_checkpoint.with_options(task_runner=runner).to_deployment("dda-index-checkpoint", parameters=params),
        attribute.with_options(task_runner=runner).to_deployment("dda-attribute", parameters=params),
        refresh_lineage.with_options(task_runner=runner).to_deployment("dda-refresh-lineage", parameters=params),
        governance_report.to_deployment("dda-report", parameters=params),
    ]


def serve_watcher(settings: Any, interval: int) -> None:
    """Serve :func:`deployments` until interrupted."""
    serve(*deployments(settings, interval))


def main() -> None:
    """``python -m deployments.serve [--interval N]``: serve with the settings of the environment."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--interval", type=int, help="seconds between watcher runs (default: DDA_WATCH_INTERVAL_SECONDS)"
    )
    args = parser.parse_args()
    settings = load_settings()
    serve_watcher(settings, args.interval or settings.watch_interval_seconds)


if __name__ == "__main__":
    main()
