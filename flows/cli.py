"""The ``dda`` command line (README.md, "Command line"): demo, ingest, index, watch, attribute, sql, settings,
report, doctor (the commands that read the store are in :mod:`flows.reading`).

Every command takes ``--data-dir`` (default ``$DDA_DATA_DIR`` or ``./dda-data``). Errors are one line on
stderr with a non-zero exit: 2 for bad input, 1 when a pass finished but some checkpoint failed.
Prefect runs in-process with a temporary server under ``<data-dir>/prefect`` unless ``PREFECT_API_URL``
points at one; its logs are shown with ``--verbose``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.reading import (
    default_dir,
    doctor_command,
    report_command,
    settings_command,
    settings_for,
    sql_command,
)


def _run(flow_fn: Any, settings: Any, **params: Any) -> Any:
    from flows.pipeline import task_runner

    return flow_fn.with_options(task_runner=task_runner(settings))(settings=settings.model_dump(mode="json"), **params)


def _demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    report = run_demo(args.data_dir or default_dir(), seed=args.seed, model=args.model, progress=not args.quiet)
    if report.first_query is None:
        return 1
    q = report.first_query
    print(f"\nfirst traced output ({q['query_id']}): {q['response']!r}  (corrected: {q['corrected']!r})")
    print("top training samples by DDA score (SQL: top_sources):")
    for r in report.top_sources:
        print(
            f"  #{r['rank']} {r['dda_score']:+.4f}  {r['sample_id']}  [{r['source']}, {r['license']}]  {r['response']}"
        )
    print("influence by source (SQL: influence_by_source):")
    for r in report.source_shares:
        share = "n/a" if r["share"] is None else f"{100 * r['share']:.1f} %"
        print(f"  {r['source']:10s} share {share:>8s}  total {r['total_score']:+.3f}  ({r['n_samples']} samples)")
    n = len(report.auc.get("DDA (the lineage view)", {}))
    print(f"\nROC-AUC against the {report.world.n_corrupted} corrupted samples, mean over {n} traced outputs (SQL):")
    for name in report.auc:
        print(f"  {name:38s} {report.mean_auc(name):.3f}")
    print(f"governance report: {report.report_html} (and report.md beside it)")
    where = Path(args.data_dir or default_dir()).resolve()
    print(f'everything is under {where}; try: dda sql "SELECT * FROM lineage LIMIT 5"')
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from flows.runs import writing
    from storage.samples import SampleIn, extra_fields, ingest_samples, read_rows
    from storage.store import LineageStore

    settings = settings_for(args)
    rows = read_rows(args.file, SampleIn)
    with writing(settings, "dda ingest"):
        store = LineageStore.open(settings.data_dir / "store")
        result = ingest_samples(store, rows, dataset=args.dataset or Path(args.file).stem)
    print(f"ingested {result.added} new samples, {result.unchanged} already registered")
    _say_extra_fields(extra_fields(rows))
    return 0


def _say_extra_fields(names: list[str]) -> None:
    if names:
        print(f"fields beyond the input contract, kept under meta: {', '.join(names)}")


def _report_pass(report: dict[str, Any]) -> None:
    print(f"indexed: {', '.join(report['indexed']) or 'nothing new'}")
    for path in report.get("pending", []):
        print(f"pending (still being written): {path}")
    lineage = report.get("lineage", {})
    print(f"lineage: {lineage.get('queries', 0)} queries, {lineage.get('folds', 0)} new checkpoint folds")
    for qid, why in lineage.get("failed", {}).items():
        print(f"output {qid} could not be traced (the others were; SQL: failed_outputs): {why}")


def _index(args: argparse.Namespace) -> int:
    from flows.pipeline import index_run

    settings = settings_for(args, base_model=args.base, run_dir=args.run, run_id=args.run_id)
    _report_pass(_run(index_run, settings))
    return 0


def _watch(args: argparse.Namespace) -> int:
    settings = settings_for(args, base_model=args.base, run_dir=args.run, run_id=args.run_id)
    if args.once:
        from flows.pipeline import watch_checkpoints

        _report_pass(_run(watch_checkpoints, settings))
        return 0
    if not os.environ.get("PREFECT_API_URL"):
        raise ValueError(
            "dda watch serves the watcher deployment and needs a Prefect server: run `prefect server start` and "
            "set PREFECT_API_URL=http://127.0.0.1:4200/api, or use `dda watch --once` for a single pass"
        )
    # The serve entry point lives in deployments/ (which imports flows, not the other way round): hand over.
    env = {"DDA_DATA_DIR": str(settings.data_dir), "DDA_BASE_MODEL": str(settings.base_model or ""),
           "DDA_RUN_DIR": str(settings.run_dir or ""), "DDA_RUN_ID": settings.effective_run_id}  # fmt: skip
    os.environ.update({k: v for k, v in env.items() if v})
    interval = str(args.interval or settings.watch_interval_seconds)
    os.execv(sys.executable, [sys.executable, "-m", "deployments.serve", "--interval", interval])


def _attribute(args: argparse.Namespace) -> int:
    if not (args.queries or args.query_id or args.all):
        raise UsageError("nothing to attribute: give a queries file, --query-id ID, or --all (every registered output)")
    if args.all and (args.queries or args.query_id or args.group):
        raise UsageError("--all refreshes every registered output: give it alone, without a file or --query-id")
    settings = settings_for(args, base_model=args.base)
    if settings.base_model is None:
        raise ValueError("no base model given: pass --base or set DDA_BASE_MODEL")
    report = _attribute_run(args, settings)
    _say_extra_fields(report.get("extra_fields", []))
    print(f"attributed {report['queries']} queries ({report['folds']} new checkpoint folds)")
    for qid in report.get("query_ids", [])[:20]:
        print(f"  {qid}")
    if report.get("groups"):
        print(f"query groups (traced jointly, mean of their members' query vectors): {', '.join(report['groups'])}")
    return 0


def _attribute_run(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """Run the attribution as the ``dda-attribute`` flow (or, with ``--all``, ``dda-refresh-lineage``) where a
    Prefect server is configured, else the same task in-process (no temporary server for an interactive command;
    the runs table still records it)."""
    if os.environ.get("PREFECT_API_URL"):
        from flows.pipeline import attribute, refresh_lineage

        if args.all:
            return dict(_run(refresh_lineage, settings))
        return dict(_run(attribute, settings, queries_file=args.queries, query_ids=args.query_id or None,
                         group=args.group))  # fmt: skip
    from flows.runs import new_run_id, recorded, writing
    from tasks.attribution import attribute_queries, raise_if_failed, refresh_queries

    report: dict[str, Any] = {}
    with writing(settings, "dda-attribute"), recorded(settings, "dda-attribute", new_run_id(), report):
        data_dir, base, cfg = settings.data_dir, str(settings.base_model), settings.pipeline_config()
        if args.all:
            report.update(refresh_queries(data_dir, base, None, cfg))
        else:
            report.update(attribute_queries(data_dir, base, args.queries, args.query_id or [], cfg, args.group))
    raise_if_failed(report)
    return report


class UsageError(ValueError):
    """The command line asks for nothing or for something contradictory (exit 2, like argparse's own errors)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dda`` with one sub-command per action."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="data folder (default: $DDA_DATA_DIR or ./dda-data)")
    common.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    parser = argparse.ArgumentParser(prog="dda", description="DDA lineage: which training samples caused this output")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[common], help="the whole pipeline end to end on an embedded canary world")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--model", choices=["smollm2", "tiny"], default="smollm2",
        help="SmolLM2-135M + LoRA checkpoints (about 4 min the first time) or a tiny LLaMA trained from scratch (30 s)",
    )  # fmt: skip
    demo.set_defaults(func=_demo)

    ingest = sub.add_parser("ingest", parents=[common], help="register training samples (JSONL or Parquet)")
    ingest.add_argument("file")
    ingest.add_argument("--dataset", help="dataset name (default: the file name)")
    ingest.set_defaults(func=_ingest)

    for name, func, text in (
        ("index", _index, "embed the base model and every checkpoint of a run not yet indexed"),
        ("watch", _watch, "serve the checkpoint watcher and the checkpoint-saved trigger (--once: a single pass)"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--base", help="base model: HF folder, .gguf file or hub name (default: the indexed one)")
        p.add_argument("--run", help="the run's Trainer output_dir (default: the indexed one)")
        p.add_argument("--run-id", help="run name (default: the run folder's name)")
        p.set_defaults(func=func)
        if name == "watch":
            p.add_argument("--once", action="store_true", help="one pass, then exit")
            p.add_argument("--interval", type=int, help="seconds between passes (default: DDA_WATCH_INTERVAL_SECONDS)")

    attr = sub.add_parser("attribute", parents=[common], help="register queries and compute or refresh their lineage")
    attr.add_argument(
        "queries", nargs="?", help="JSONL of outputs to trace: prompt, response, optional corrected, id, group"
    )
    attr.add_argument(
        "--group",
        help="trace the file's rows (those without a group field) jointly as this query "
        "group, beside each output; its lineage is query 'group:NAME'",
    )
    attr.add_argument("--query-id", action="append", help="refresh an already registered query (repeatable)")
    attr.add_argument("--all", action="store_true", help="refresh the lineage of every registered output")
    attr.add_argument("--base", help="base model (default: the indexed one)")
    attr.set_defaults(func=_attribute)

    sql = sub.add_parser("sql", parents=[common], help="read-only SQL over the lineage views")
    sql.add_argument("sql", help="one SELECT statement, or a named query with --named")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--named", action="store_true", help="run a named lineage query, e.g. top_sources")
    sql.add_argument("--param", action="append", help="parameter of a named query, NAME=VALUE (repeatable)")
    sql.add_argument("--timeout", type=float, default=5.0, help="seconds before the query is stopped (default 5)")
    sql.add_argument(
        "--max-rows", type=int, help="rows at most (default: 10000 shown as a table; CSV and JSON exports are complete)"
    )
    sql.set_defaults(func=sql_command)

    current = sub.add_parser(
        "settings", parents=[common], help="the current settings, their fingerprint, and the fingerprints in the store"
    )
    current.set_defaults(func=settings_command)

    doctor = sub.add_parser("doctor", parents=[common], help="check every table for rows sharing a natural key")
    doctor.add_argument("--repair", action="store_true", help="remove them (holds the writer lock)")
    doctor.set_defaults(func=doctor_command)

    report = sub.add_parser(
        "report", parents=[common], help="the data-governance report: self-contained HTML + Markdown"
    )
    report.add_argument("--out", help="output folder (default: <data-dir>/report); a previous report is replaced")
    report.add_argument("--query-id", action="append", help="report this traced output only (repeatable)")
    report.add_argument("--top-k", type=int, default=10, help="training samples listed per output (default 10)")
    report.add_argument(
        "--settings-fingerprint", help="report the lineage scored under these settings (default: the current ones)"
    )
    report.set_defaults(func=report_command)
    return parser


READ_ONLY = ("sql", "settings", "doctor", "report")


def _prepare_environment(args: argparse.Namespace) -> None:
    from flows.env import apply_prefect_environment

    data_dir = Path(args.data_dir or default_dir())
    apply_prefect_environment(data_dir)
    if args.command not in READ_ONLY:  # reading creates nothing under the data folder
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.quiet:
        os.environ.setdefault("DDA_INDEXING__PROGRESS", "false")


def _message(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        return f"setting {where}: {first['msg']} (see the README's configuration table)"
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return str(text).splitlines()[0] if str(text) else type(exc).__name__


def _stop_on_sigterm(command: str) -> None:
    """Make SIGTERM (``kill``, a service manager stopping ``dda watch``) end the command like Ctrl-C: a one-line
    notice, then ``SystemExit(143)``, so that exit handlers run and the temporary Prefect server stops with the CLI.

    Prefect's flow engine takes SIGTERM over during a flow run; once in-flight shards end, it restores this handler
    and re-sends the signal. Without it the default action kills the process and the server is left running.
    """

    def stop(signum: int, _frame: object) -> None:
        print(f"dda {command}: stopped by signal {signum}; run it again to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dda`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if argv is None:  # the console script (not a caller's process, e.g. a test runner's): own SIGTERM
        _stop_on_sigterm(args.command)
    _prepare_environment(args)
    try:
        return int(args.func(args))
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        pipeline = sys.modules.get("flows.pipeline")  # imported only by commands that run flows (prefect)
        attribution = sys.modules.get("tasks.attribution")
        if pipeline is not None and isinstance(exc, pipeline.CheckpointsFailedError):
            if exc.report:
                _report_pass(exc.report)
            print(f"dda {args.command}: error: {_message(exc)}", file=sys.stderr)
            return 1
        if attribution is not None and isinstance(exc, attribution.OutputsFailedError):
            print(f"attributed {exc.report.get('queries', 0)} queries ({exc.report.get('folds', 0)} new checkpoint "
                  "folds)")  # fmt: skip
            print(f"dda {args.command}: error: {_message(exc)}", file=sys.stderr)
            return 1
        print(f"dda {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
