"""Attribute outputs end to end as plain functions: register queries, embed them, fold their lineage.

The ``dda-attribute`` flow runs :func:`attribute_queries` as a task; ``dda attribute`` calls it directly when
no Prefect server is configured (README: when a temporary server is worth its cost). No Prefect here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from storage.registry import clear_trace_failures, write_trace_failures
from storage.samples import (
    GROUP_PREFIX,
    QueryIn,
    extra_fields,
    group_id,
    group_members,
    read_rows,
    register_groups,
    register_queries,
)
from storage.store import LineageStore, where_in
from tasks.config import PipelineConfig
from tasks.indexing import indexed_checkpoints
from tasks.lineage import refresh_lineage
from tasks.tracing import check_lengths, embed_queries, plan_tracing

QUERY_BATCH = 128  # queries scored together: each batch reads every checkpoint's matrix once
# What an output's own failure may raise (bad text, a tokenizer or model error on it); anything else — a lock,
# a missing model, an interrupted run — stops the command as before.
OUTPUT_ERRORS = (ValueError, KeyError, IndexError, RuntimeError, TypeError)


class OutputsFailedError(RuntimeError):
    """Some outputs could not be traced; every other one was (``report`` says what was done; exit 1)."""

    exit_code = 1

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _isolated(
    ids: list[str], run: Callable[[list[str]], object], failures: dict[str, tuple[str | None, str, str]],
    checkpoint_id: str | None, stage: str,
) -> None:  # fmt: skip
    """Run ``run(ids)``; if it raises an output error, run each id alone and record the ones that fail."""
    try:
        run(ids)
        return
    except OUTPUT_ERRORS as e:
        if len(ids) == 1:
            failures[ids[0]] = (checkpoint_id, stage, _one_line(e))
            return
    for qid in ids:
        try:
            run([qid])
        except OUTPUT_ERRORS as e:
            failures[qid] = (checkpoint_id, stage, _one_line(e))


def refresh_queries(
    data_dir: str | Path, base_reference: str, query_ids: Sequence[str] | None, config: PipelineConfig
) -> dict[str, Any]:
    """Embed ``query_ids`` (None: every registered query) at every indexed checkpoint where they are not yet
    embedded, then fold the missing checkpoints into their DDA states, :data:`QUERY_BATCH` queries at a time.

    An output that fails (at some checkpoint's embedding, or at scoring) is isolated: it is recorded as failed in
    ``trace_status`` (SQL: ``failed_outputs``) with its reason and left out; every other output is traced, and a
    group with a failed member fails with it. Returns {queries, folds, failed: {query_id: reason}}; raises nothing
    for an output's own failure (the caller decides: ``dda attribute`` exits 1, a watcher pass goes on)."""
    store = LineageStore.open(Path(data_dir) / "store")
    if query_ids is None:
        ids = sorted(store.read("queries", ["query_id"])["query_id"].to_pylist())
    else:
        ids = list(query_ids)
        _check_registered(store, ids)
    if not ids:
        return {"queries": 0, "folds": 0, "failed": {}}
    failures: dict[str, tuple[str | None, str, str]] = {}
    checkpoints = {c["checkpoint_id"]: c for c in indexed_checkpoints(data_dir)}
    for work in plan_tracing(data_dir, ids, config):  # per state, in order: each state loaded once
        todo = _without_failed(store, [*work.outputs, *work.groups], failures)
        run = lambda qs, c=checkpoints[work.checkpoint_id]: embed_queries(data_dir, base_reference, c, qs, config)  # noqa: E731
        _isolated(todo, run, failures, work.checkpoint_id, "embed")
    live = _without_failed(store, ids, failures)
    folds = 0

    def fold(qs: list[str]) -> None:
        nonlocal folds
        folds += refresh_lineage(data_dir, base_reference, qs, config)

    for batch in [live[i : i + QUERY_BATCH] for i in range(0, len(live), QUERY_BATCH)]:
        _isolated(batch, fold, failures, None, "score")
    write_trace_failures(store, failures)
    clear_trace_failures(store, [q for q in ids if q not in failures])
    failed = {q: f"{'scoring' if c is None else c}: {e}" for q, (c, _, e) in sorted(failures.items())}
    return {"queries": len(ids) - len(failed), "folds": folds, "failed": failed}


def _check_registered(store: LineageStore, ids: list[str]) -> None:
    """Raise KeyError naming the first of ``ids`` that is not registered (a usage error, not an output's failure)."""
    found = set(store.read("queries", ["query_id"], where_in("query_id", ids))["query_id"].to_pylist())
    missing = [q for q in ids if q not in found]
    if missing:
        raise KeyError(f"query {missing[0]!r} is not registered: run dda attribute with a queries file")


def _without_failed(store: LineageStore, ids: list[str], failures: dict[str, tuple[str | None, str, str]]) -> list[str]:
    """``ids`` less the failed outputs and the groups with a failed member (recorded as failed too)."""
    groups = group_members(store, [q for q in ids if q.startswith(GROUP_PREFIX)])
    for gid, members in groups.items():
        bad = [m for m in members if m in failures]
        if bad and gid not in failures:
            checkpoint_id, stage, _ = failures[bad[0]]
            failures[gid] = (checkpoint_id, stage, f"member {bad[0]!r} of the group failed")
    return [q for q in ids if q not in failures]


def raise_if_failed(report: dict[str, Any]) -> None:
    """Raise :class:`OutputsFailedError` naming the outputs ``report`` lists as failed (at most three shown)."""
    failed = report.get("failed") or {}
    if failed:
        shown = "; ".join(f"{q} ({why})" for q, why in list(failed.items())[:3])
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise OutputsFailedError(
            f"{len(failed)} output(s) could not be traced, the others were — {shown}{more} "
            "(SQL: SELECT * FROM failed_outputs)", report,
        )  # fmt: skip


def attribute_queries(
    data_dir: str | Path, base_reference: str, queries_file: str | None, query_ids: Sequence[str],
    config: PipelineConfig, group: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Register the queries of ``queries_file`` (checked against the context length first) and ``query_ids``,
    then compute or refresh their lineage; returns what was done (queries, folds, query_ids, groups,
    extra_fields).

    Rows with a ``group`` field, and with ``group`` every row of the file without one, also form query groups
    (:func:`storage.samples.register_groups`) traced with their members.
    """
    ids = list(query_ids)
    extra: list[str] = []
    groups: dict[str, list[str]] = {}
    if queries_file is not None:
        rows = read_rows(queries_file, QueryIn)
        names = [f"{q.where}: query {q.query_id!r}" for q in rows]
        texts = [(n, q.prompt, t) for n, q in zip(names, rows, strict=True) for t in (q.response, q.corrected) if t]
        check_lengths(base_reference, texts, config)
        store = LineageStore.open(Path(data_dir) / "store")
        registered = register_queries(store, rows)
        ids += registered
        for row, qid in zip(rows, registered, strict=True):
            if row.group or group:
                groups.setdefault(row.group or str(group), []).append(qid)
        ids += register_groups(store, groups)
        extra = extra_fields(rows)
    elif group is not None:
        raise ValueError("--group names the group of a queries file's rows: give a queries file")
    chosen = sorted(set(ids))
    report = refresh_queries(data_dir, base_reference, chosen, config)
    return {**report, "query_ids": chosen, "groups": sorted(group_id(g) for g in groups), "extra_fields": extra}
