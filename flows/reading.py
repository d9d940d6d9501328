"""The commands that read the store (``dda sql``, ``dda settings``, ``dda report``, ``dda doctor``) and the settings
helpers every command uses.

The SQL views ``lineage``, ``scores``, ``source_influence`` and ``license_influence`` show the rows of the current
settings (their fingerprint, :func:`settings_for`); ``…_all`` shows every fingerprint's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

TABLE_ROWS = 10_000  # rows ``dda sql --format table`` shows unless --max-rows says otherwise
FINGERPRINTS_SQL = (
    "SELECT settings_fingerprint, count(DISTINCT query_id) AS outputs FROM _dda_state "
    "GROUP BY settings_fingerprint ORDER BY settings_fingerprint"
)


def settings_for(args: argparse.Namespace, **overrides: Any) -> Any:
    """The settings tree for a command: environment, ``--data-dir`` and ``overrides``, the indexed base and run."""
    from flows.settings import load_settings

    values = {"data_dir": args.data_dir, **overrides}
    settings = load_settings(None, **values)
    return with_registered(settings)


def current_fingerprint(args: argparse.Namespace) -> str:
    """The current settings' fingerprint (projection and scoring only: no need to read the indexed base and run)."""
    from flows.settings import load_settings

    return str(load_settings(None, data_dir=args.data_dir).fingerprint)


def with_registered(settings: Any) -> Any:
    """Fill a missing base model and run folder from what the data folder has indexed."""
    from storage.registry import read_checkpoints
    from storage.store import LineageStore

    store_dir = settings.data_dir / "store"
    if (settings.base_model is not None and settings.run_dir is not None) or not store_dir.exists():
        return settings
    rows = read_checkpoints(LineageStore.open(store_dir))
    update: dict[str, Any] = {}
    base = [r for r in rows if r["role"] == "base"]
    tuned = [r for r in rows if r["role"] == "finetuned"]
    if settings.base_model is None and base:
        update["base_model"] = base[0]["path"]
    if settings.run_dir is None and tuned:
        update["run_dir"] = Path(tuned[-1]["path"]).parent
        update["run_id"] = settings.run_id or tuned[-1]["run_id"]
    return settings.model_copy(update=update)


def default_dir() -> str:
    """``$DDA_DATA_DIR`` or ``dda-data``."""
    return os.environ.get("DDA_DATA_DIR", "dda-data")


def report_command(args: argparse.Namespace) -> int:
    from flows.runs import new_run_id, observed
    from storage.report import gather
    from storage.store import open_existing
    from tasks.report import write_report

    settings = settings_for(args)
    fp = args.settings_fingerprint or settings.fingerprint
    wrote: dict[str, str] = {}
    with observed(settings, "dda-report", new_run_id(), wrote):
        data = gather(open_existing(settings.data_dir / "store"), fp, args.query_id or None, top_k=args.top_k)
        files = write_report(data, args.out or settings.data_dir / "report", progress=settings.indexing.progress,
                             lock_timeout=settings.lock_timeout_seconds)  # fmt: skip
        wrote.update({"html": str(files.html), "markdown": str(files.markdown)})
    print(f"report of {len(data.queries)} traced outputs under settings {fp} ({len(files.plots)} plots):")
    print(f"  {files.html}\n  {files.markdown}")
    return 0


def sql_command(args: argparse.Namespace) -> int:
    """``dda sql``: one read-only query (or a named one) under the current settings' views.

    ``--format table`` shows at most ``--max-rows`` rows (default :data:`TABLE_ROWS`); CSV and JSON are exports,
    streamed batch by batch, complete unless ``--max-rows`` caps them. The timeout and memory limit still apply.
    """
    from storage.sql import NAMED_QUERIES, TRUNCATED, named_params, render_stream, stream
    from storage.store import open_existing

    store = open_existing(Path(args.data_dir or default_dir()) / "store")
    fp = current_fingerprint(args)
    if args.named:
        pairs = [p.partition("=") for p in args.param or []]
        bad = [k for k, eq, _ in pairs if not eq or not k]
        if bad:
            raise ValueError(f"--param {bad[0]!r} is not NAME=VALUE")
        typed = named_params(args.sql, {k: v for k, _, v in pairs})
        sql, params = NAMED_QUERIES[args.sql], {**typed, "fp": fp}
    else:
        sql, params = args.sql, None
    cap = args.max_rows if args.max_rows is not None else (TABLE_ROWS if args.format == "table" else None)
    rows = stream(store, sql, params, timeout=args.timeout, max_rows=cap, settings_fingerprint=fp)
    truncated = False
    for text in render_stream(rows, args.format):
        if text is TRUNCATED:
            truncated = True
        else:
            print(text)
    if truncated:
        print(f"dda sql: only the first {cap} rows are shown: add a LIMIT or raise --max-rows", file=sys.stderr)
    _say_other_fingerprints(store, sql, fp)
    return 0


def _say_other_fingerprints(store: Any, sql: str, fp: str) -> None:
    """One stderr line when ``sql`` reads a current-settings view but the store's lineage is all under others."""
    from storage.sql import FINGERPRINTED, query

    words = set(re.findall(r"\w+", sql.lower()))
    if not words & set(FINGERPRINTED):
        return
    held = [r["settings_fingerprint"] for r in query(store, FINGERPRINTS_SQL).to_pylist()]
    if held and fp not in held:
        print(f"dda sql: no lineage under the current settings ({fp}); the store holds {', '.join(held)}: "
              "query lineage_all / scores_all, or see `dda settings`", file=sys.stderr)  # fmt: skip


def settings_command(args: argparse.Namespace) -> int:
    """``dda settings``: the current settings (what the environment and the data folder give), their fingerprint,
    and the fingerprints the store holds lineage under (outputs and rows each)."""
    from storage.sql import query
    from storage.store import LineageStore

    settings = settings_for(args)
    shown = settings.model_dump(mode="json", include={"projection", "scoring", "indexing"})
    print(json.dumps({"settings_fingerprint": settings.fingerprint, **shown}, indent=2))
    store_dir = settings.data_dir / "store"
    if not store_dir.exists():
        return 0
    held = query(LineageStore.open(store_dir), FINGERPRINTS_SQL).to_pylist()
    for r in held:
        mark = "  (current)" if r["settings_fingerprint"] == settings.fingerprint else ""
        print(f"lineage under {r['settings_fingerprint']}: {r['outputs']} outputs{mark}", file=sys.stderr)
    if not held:
        print("no lineage in the store yet", file=sys.stderr)
    return 0


def doctor_command(args: argparse.Namespace) -> int:
    from flows.runs import writing
    from storage.doctor import find_duplicates, repair
    from storage.store import open_existing

    data_dir = Path(args.data_dir or default_dir())
    store = open_existing(data_dir / "store")
    found = find_duplicates(store)
    for d in found:
        key = ", ".join(f"{k}={v!r}" for k, v in d.example.items())
        print(f"{d.table}: {d.n_keys} keys held by several rows ({d.n_surplus} surplus), e.g. ({key})")
    if not found:
        print(f"{data_dir}: every table holds one row per natural key")
        return 0
    if not args.repair:
        print("run `dda doctor --repair` to remove the surplus rows", file=sys.stderr)
        return 1
    from flows.settings import load_settings

    with writing(
        load_settings(None, data_dir=str(data_dir)), "dda doctor --repair"
    ):  # no registry read: it may be damaged
        for line in repair(store):
            print(f"repaired {line}")
    return 0
