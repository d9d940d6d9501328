"""Prefect flows of DDA lineage: index a checkpoint, index a run, watch for checkpoints, attribute, refresh.

Flows only wire the plain functions of :mod:`tasks` (which do the IO and compute); tasks exchange small
references (paths, ids, plans), never tensors or models. Correctness does not depend on Prefect: every
write is an idempotent upsert, so any flow can be killed and re-run. The task runner is configuration
(:func:`task_runner`): threads by default, Dask with ``DDA_RUNNER__KIND=dask``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.runs import new_run_id, observed, recorded, writing
from flows.settings import DDASettings, load_settings
from storage.errors import StorageError
from storage.report import ReportData, gather
from storage.store import LineageStore, open_existing
from tasks import attribution, checkpoints, indexing
from tasks.checkpoints import CheckpointError, CheckpointInfo
from tasks.indexing import CheckpointPlan
from tasks.report import write_report
from tasks.report_format import render_markdown, summary_table

T = TypeVar("T")
SUMMARY_KEY = "dda-lineage-summary"
TABLE_KEY = "dda-lineage-top-samples"
ARTIFACT_QUERIES = 20


def _task(fn: Callable[..., T], name: str) -> Any:
    """A Prefect task around a plain function: no caching (writes are idempotent), no retries on compute."""
    return task(fn, name=name, cache_policy=NO_CACHE)


discover_task = _task(checkpoints.discover_checkpoints, "discover-checkpoints")
wait_written_task = _task(checkpoints.wait_until_written, "wait-until-written")
plan_task = _task(indexing.plan_checkpoint, "plan-checkpoint")
embed_shard_task = _task(indexing.embed_shard, "embed-shard")
finish_task = _task(indexing.finish_checkpoint, "finish-checkpoint")
refresh_queries_task = _task(attribution.refresh_queries, "refresh-lineage")
attribute_task = _task(attribution.attribute_queries, "attribute-queries")


class CheckpointsFailedError(CheckpointError):
    """One or more checkpoints of a pass failed; the others were indexed (``report`` says what was done)."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


def task_runner(settings: DDASettings) -> TaskRunner[Any]:
    """The configured task runner: a thread pool, or prefect-dask's runner (an existing or a local cluster)."""
    r = settings.runner
    if r.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=r.max_workers)
    from prefect_dask import DaskTaskRunner

    if r.dask_address:
        return DaskTaskRunner(address=r.dask_address)  # type: ignore[no-any-return]
    kwargs = {"n_workers": r.dask_workers, "threads_per_worker": 1, "processes": True}
    return DaskTaskRunner(cluster_kwargs=kwargs)  # type: ignore[no-any-return]


def _require(settings: DDASettings, *names: str) -> None:
    for name in names:
        if getattr(settings, name) is None:
            option = "--" + name.replace("_", "-")
            raise CheckpointError(f"no {name.replace('_', ' ')} given: pass {option} or set DDA_{name.upper()}")


@contextmanager
def recorded_run(settings: DDASettings, wrote: dict[str, Any]) -> Iterator[None]:
    """Hold the writer lock and record the current flow run in the store's ``runs`` table
    (:func:`flows.runs.recorded`)."""
    name = str(flow_run.flow_name or "flow")
    with writing(settings, name), recorded(settings, name, _run_id(), wrote):
        yield


def _index_one(settings: DDASettings, info: CheckpointInfo | None) -> CheckpointPlan:
    """Plan, embed the missing samples shard by shard (parallel tasks; one shard under the thread runner runs in the
    flow's own thread: no worker thread to wait on), then mark the checkpoint indexed."""
    cfg = settings.pipeline_config()
    base, data_dir = str(settings.base_model), str(settings.data_dir)
    plan: CheckpointPlan = plan_task(data_dir, base, settings.effective_run_id, info, cfg)
    if plan.already_indexed and not plan.shards:
        return plan
    if len(plan.shards) == 1 and settings.runner.kind == "threads":  # nothing to overlap: the flow's thread embeds it
        embed_shard_task(data_dir, base, plan, plan.shards[0], cfg)
    else:
        futures = [embed_shard_task.submit(data_dir, base, plan, shard, cfg) for shard in plan.shards]
        wait(futures)
        for f in futures:
            f.result()
    finish_task(data_dir, base, plan, cfg)
    return plan


@flow(name="dda-index-checkpoint")
def index_checkpoint(
    checkpoint_path: str | None = None, data_dir: str | None = None, base_model: str | None = None,
    run_id: str | None = None, settings: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Index one checkpoint folder (``checkpoint_path`` None: the base model): embed every missing sample."""
    s = load_settings(settings, data_dir=data_dir, base_model=base_model, run_id=run_id)
    _require(s, "base_model")
    info = None if checkpoint_path is None else checkpoints.inspect_checkpoint(Path(checkpoint_path), 0.0)
    wrote: dict[str, Any] = {}
    with writing(s, "dda-index-checkpoint"), observed(s, "dda-index-checkpoint", _run_id(), wrote):
        plan = _index_one(s, info)
        wrote.update({"checkpoint": plan.checkpoint_id, "embedded": sum(len(x) for x in plan.shards)})
    return wrote


def _run_id() -> str:
    """The current Prefect flow run's id (a fresh one outside a flow run)."""
    return str(flow_run.id or new_run_id())


def _refresh(settings: DDASettings, query_ids: list[str] | None = None) -> dict[str, Any]:
    """Embed the queries at every indexed checkpoint, then fold missing checkpoints into their DDA states."""
    cfg = settings.pipeline_config()
    result: dict[str, Any] = refresh_queries_task(str(settings.data_dir), str(settings.base_model), query_ids, cfg)
    return result


def _open_existing_store(settings: DDASettings) -> LineageStore:
    """The data folder's store; a folder without one is an error (reading must not create it)."""
    return open_existing(Path(settings.data_dir) / "store")


def publish_summary(settings: DDASettings, query_ids: list[str] | None = None) -> None:
    """Publish the lineage summary of the store as artifacts of the current flow run (:func:`publish_report`);
    a one-line note when there is no lineage under the settings yet."""
    try:
        data = gather(_open_existing_store(settings), settings.fingerprint, query_ids)
    except StorageError as e:
        create_markdown_artifact(f"No lineage to summarise yet: {e}", key=SUMMARY_KEY, description="DDA lineage")
        return
    publish_report(data)


def publish_report(data: ReportData) -> None:
    """Publish ``data`` as Prefect artifacts of the current flow run: the Markdown summary and a table.

    The Markdown is :func:`tasks.report_format.render_markdown` without plots, with at most :data:`ARTIFACT_QUERIES`
    outputs in full (``dda report`` has every one); the table has one row per (output, top-k sample) of those.
    """
    fp = data.settings_fingerprint
    shown = replace(data, queries=data.queries[:ARTIFACT_QUERIES])
    markdown = render_markdown(shown, None, total_queries=len(data.queries))
    create_markdown_artifact(markdown, key=SUMMARY_KEY, description=f"DDA lineage summary, settings {fp}")
    create_table_artifact(
        summary_table(shown), key=TABLE_KEY, description=f"top samples per traced output, settings {fp}"
    )


def _index_pass(settings: DDASettings, upto: CheckpointInfo | None = None) -> dict[str, Any]:
    """Base model, then every complete checkpoint in step order; failures are collected, the others go on.

    ``upto``: an announced checkpoint (already waited for): the pass stops at its step and takes it as given.
    """
    _require(settings, "base_model", "run_dir")
    logger = get_run_logger()
    report: dict[str, Any] = {"indexed": [], "pending": [], "failed": {}}
    with recorded_run(settings, report):
        infos = discover_task(str(settings.run_dir), settings.indexing.settle_seconds)
        if upto is not None:
            infos = [i for i in infos if i.step < upto.step] + [upto]
        base_plan = _index_one(settings, None)
        if not base_plan.already_indexed:
            report["indexed"].append(base_plan.checkpoint_id)
        for info in infos:
            if info.status == "pending":
                logger.info("checkpoint %s is still being written: skipped this pass", info.path)
                report["pending"].append(info.path)
                continue
            try:
                plan = _index_one(settings, info)
            except (CheckpointError, ValueError, OSError) as e:
                logger.error("checkpoint %s failed: %s", info.path, e)
                report["failed"][info.path] = str(e)
                continue
            if plan.shards or not plan.already_indexed:
                report["indexed"].append(plan.checkpoint_id)
        report["lineage"] = _refresh(settings)
        for qid, why in report["lineage"].get("failed", {}).items():  # isolated: the pass itself goes on
            logger.warning("output %s could not be traced: %s", qid, why)
        publish_summary(settings)
        if report["failed"]:
            detail = "; ".join(f"{p}: {m}" for p, m in report["failed"].items())
            message = f"{len(report['failed'])} checkpoint(s) failed, the others were indexed — {detail}"
            raise CheckpointsFailedError(message, report)
    return report


@flow(name="dda-index-run")
def index_run(
    data_dir: str | None = None, base_model: str | None = None, run_dir: str | None = None,
    run_id: str | None = None, settings: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Index the base model and every checkpoint of a run not yet indexed (in step order), then refresh lineage.

    :func:`watch_checkpoints` is the same pass, served on a schedule.
    """
    s = load_settings(settings, data_dir=data_dir, base_model=base_model, run_dir=run_dir, run_id=run_id)
    return _index_pass(s)


@flow(name="dda-watch-checkpoints")
def watch_checkpoints(
    data_dir: str | None = None, base_model: str | None = None, run_dir: str | None = None,
    run_id: str | None = None, settings: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One pass of the scheduled watcher: the same work as :func:`index_run`, under its own flow name.

    A separate function, not ``index_run.with_options(name=…)``: a served deployment re-imports its flow
    by function name, which would run (and record) it as ``dda-index-run``.
    """
    s = load_settings(settings, data_dir=data_dir, base_model=base_model, run_dir=run_dir, run_id=run_id)
    return _index_pass(s)


@flow(name="dda-index-saved-checkpoint")
def index_saved_checkpoint(
    checkpoint_path: str, run_dir: str | None = None, data_dir: str | None = None, base_model: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The flow of the ``dda.checkpoint.saved`` event (:mod:`flows.checkpoint_events`): wait until the announced
    checkpoint is written (re-checked while it is still being written, failed only once it is corrupt), index it
    and every earlier checkpoint of its run not yet indexed, in step order, then refresh lineage.

    The watcher's pass bounded at the announced step, under the same writer lock: a checkpoint that the watcher
    (or an earlier event) indexed is not indexed again. ``run_dir`` defaults to the checkpoint's parent folder;
    the run id of the settings applies only when they name that same run folder.
    """
    folder = Path(checkpoint_path).resolve()
    run = Path(run_dir).resolve() if run_dir else folder.parent
    if run != folder.parent:
        raise CheckpointError(f"checkpoint {folder} is not in the announced run folder {run}: announce its parent")
    served = load_settings(settings, data_dir=data_dir, base_model=base_model)
    _require_served_data_dir(served, explicit=data_dir is not None)
    s = served.model_copy(update={"run_dir": run, "run_id": served.run_id if served.run_dir == run else None})
    _require(s, "base_model")
    info: CheckpointInfo = wait_written_task(folder, s.indexing.settle_seconds)
    return _index_pass(s, upto=info)


def _require_served_data_dir(settings: DDASettings, explicit: bool) -> None:
    """Refuse an event's run whose settings name another data folder than the serving process's ``DDA_DATA_DIR``.

    A deployment's trigger outlives the process that served it: an event that arrives after ``dda watch`` stopped
    creates a run with that serve's settings, and a later serve of another data folder would execute it into the
    old folder. A ``data_dir`` passed with the run itself is the caller's choice and is not checked."""
    here = os.environ.get("DDA_DATA_DIR")
    if explicit or not here or Path(here).resolve() == settings.data_dir:
        return
    raise CheckpointError(
        f"this run's settings name data folder {settings.data_dir}, but this process serves {Path(here).resolve()} "
        "(DDA_DATA_DIR): a trigger left by an earlier serve of that folder, or a settings parameter that contradicts "
        "the environment; nothing was indexed (the next checkpoint's event or `dda index --run` indexes it here)"
    )


@flow(name="dda-attribute")
def attribute(
    queries_file: str | None = None, query_ids: list[str] | None = None, data_dir: str | None = None,
    base_model: str | None = None, settings: dict[str, Any] | None = None, group: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Register the queries of ``queries_file`` (and/or ``query_ids``; the file's rows joined to query groups by
    their ``group`` field or ``group``); compute their lineage over all checkpoints."""
    s = load_settings(settings, data_dir=data_dir, base_model=base_model)
    _require(s, "base_model")
    report: dict[str, Any] = {}
    with recorded_run(s, report):
        cfg = s.pipeline_config()
        report.update(attribute_task(str(s.data_dir), str(s.base_model), queries_file, query_ids or [], cfg, group))
        publish_summary(s, report["query_ids"] or None)
    attribution.raise_if_failed(report)  # after the run is recorded: the other outputs were traced
    return report


@flow(name="dda-refresh-lineage")
def refresh_lineage(
    data_dir: str | None = None, base_model: str | None = None, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Bring the lineage of every registered query up to date with every indexed checkpoint."""
    s = load_settings(settings, data_dir=data_dir, base_model=base_model)
    _require(s, "base_model")
    report: dict[str, Any] = {}
    with recorded_run(s, report):
        report.update(_refresh(s))
        publish_summary(s)
    attribution.raise_if_failed(report)
    return report


@flow(name="dda-report")
def governance_report(
    out_dir: str | None = None, query_ids: list[str] | None = None, top_k: int = 10,
    settings_fingerprint: str | None = None, data_dir: str | None = None, settings: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write the data-governance report (HTML, Markdown, JSON, plots) and publish its summary as artifacts.

    ``out_dir`` defaults to ``<data_dir>/report``; ``query_ids`` to every query with lineage under the
    settings fingerprint (default: that of ``settings``).
    """
    s = load_settings(settings, data_dir=data_dir)
    fp = settings_fingerprint or s.fingerprint
    wrote: dict[str, Any] = {}
    with observed(s, "dda-report", _run_id(), wrote):
        data = gather(_open_existing_store(s), fp, query_ids, top_k=top_k)
        files = write_report(
            data, out_dir or Path(s.data_dir) / "report", progress=s.indexing.progress,
            lock_timeout=s.lock_timeout_seconds,
        )  # fmt: skip
        wrote.update({"folder": str(files.folder), "html": str(files.html), "markdown": str(files.markdown),
                      "queries": len(data.queries), "plots": len(files.plots), "settings_fingerprint": fp})  # fmt: skip
    publish_report(data)
    return wrote


FLOWS = (
    index_checkpoint, index_run, watch_checkpoints, index_saved_checkpoint, attribute, refresh_lineage,
    governance_report,
)  # fmt: skip
