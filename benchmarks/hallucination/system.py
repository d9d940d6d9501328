"""The system under test, run through its own flows, and its scores read back through the SQL views."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.hallucination.config import Log


def run_system(
    root: Path, name: str, base_dir: Path, overrides: dict[str, Any], variants: list[dict[str, Any]], log: Log
) -> dict[str, Any]:
    """Ingest, index every model state with ``dda-index-checkpoint``, then ``dda-attribute`` once per variant.

    Returns seconds per model state (indexing), per variant (attribution) and the settings fingerprints.
    Seconds are those of the run that did the work (kept in ``timings.json``), so a resumed run reports
    what the work cost, not the time it took to find it done.
    """
    from flows.pipeline import attribute, index_checkpoint, load_settings
    from storage.samples import SampleIn, ingest_samples, read_rows
    from storage.store import LineageStore
    from tasks.checkpoints import discover_checkpoints

    data_dir = root / name
    common = {"data_dir": str(data_dir), "base_model": str(base_dir)}
    base_settings = load_settings({**overrides, "indexing": {"batch_size": 16, "progress": False}}, **common)
    store = LineageStore.open(data_dir / "store")
    ingest_samples(store, read_rows(str(root / "train.jsonl"), SampleIn), dataset="canary-train")
    saved = data_dir / "timings.json"
    timings: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() else {"index": {}, "attribute": {}}
    timings["fingerprints"] = {}
    states = [None, *[c.path for c in discover_checkpoints(root / "run", 0.0)]]
    for path in states:
        t0 = time.perf_counter()
        done = index_checkpoint(checkpoint_path=None if path is None else str(path), run_id="run",
                                settings=base_settings.model_dump(mode="json"))  # fmt: skip
        if done["embedded"] or done["checkpoint"] not in timings["index"]:
            timings["index"][done["checkpoint"]] = time.perf_counter() - t0
        log(f"{root.name}/{name}: {done['checkpoint']} indexed ({done['embedded']} samples embedded now); "
            f"{timings['index'][done['checkpoint']]:.0f} s")  # fmt: skip
    queries_file: str | None = str(root / "queries.jsonl")
    for variant in variants:
        settings = load_settings({**overrides, **variant, "indexing": {"batch_size": 16, "progress": False}}, **common)
        key = json.dumps(variant, sort_keys=True)
        t0 = time.perf_counter()
        if queries_file is not None:
            done = attribute(queries_file=queries_file, settings=settings.model_dump(mode="json"))
            queries_file = None
        else:
            ids = sorted(store.read("queries", ["query_id"])["query_id"].to_pylist())
            done = attribute(query_ids=ids, settings=settings.model_dump(mode="json"))
        if done["folds"] or key not in timings["attribute"]:
            timings["attribute"][key] = time.perf_counter() - t0
        timings["fingerprints"][key] = settings.fingerprint
    saved.write_text(json.dumps(timings, indent=1))
    return timings


def score_cube(
    store: Any, fp: str, ckpts: list[str], qids: list[str], sids: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """s̃_t and s̃_0 of ``qids`` under one settings fingerprint from the ``scores`` view: two arrays (T, m, n)."""
    from storage.sql import query

    rows = query(store, "SELECT query_id, sample_id, checkpoint_id, score, base_score FROM scores "
                 "WHERE settings_fingerprint = $fp AND query_id IN (SELECT unnest($qids))",
                 {"fp": fp, "qids": qids})  # fmt: skip
    t_at, q_at, s_at = ({v: i for i, v in enumerate(x)} for x in (ckpts, qids, sids))
    s = np.full((len(ckpts), len(qids), len(sids)), np.nan)
    b = np.full_like(s, np.nan)
    cols = {k: rows[k].to_pylist() for k in ("query_id", "sample_id", "checkpoint_id")}
    ti = np.array([t_at[c] for c in cols["checkpoint_id"]])
    qi = np.array([q_at[c] for c in cols["query_id"]])
    si = np.array([s_at[c] for c in cols["sample_id"]])
    s[ti, qi, si] = rows["score"].to_numpy()
    b[ti, qi, si] = rows["base_score"].to_numpy()
    if np.isnan(s).any():
        raise RuntimeError(f"the scores view lacks {int(np.isnan(s).sum())} (checkpoint, query, sample) rows for {fp}")
    return s, b


def lineage_matrix(store: Any, fp: str, qids: list[str], sids: list[str]) -> np.ndarray:
    """dda_score (m, n) of ``qids`` under one settings fingerprint from the ``lineage`` view."""
    from storage.sql import query

    rows = query(store, "SELECT query_id, sample_id, dda_score FROM lineage WHERE settings_fingerprint = $fp",
                 {"fp": fp})  # fmt: skip
    q_at, s_at = ({v: i for i, v in enumerate(x)} for x in (qids, sids))
    out = np.full((len(qids), len(sids)), np.nan)
    for q, s, v in zip(rows["query_id"].to_pylist(), rows["sample_id"].to_pylist(), rows["dda_score"].to_pylist(),
                       strict=True):  # fmt: skip
        if q in q_at:  # other queries (e.g. a group's members) share the fingerprint
            out[q_at[q], s_at[s]] = v
    if np.isnan(out).any():
        raise RuntimeError(f"the lineage view lacks rows for settings {fp}")
    return out


def variant(precond: str, norm: str, kind: str) -> dict[str, Any]:
    """A study scoring variant (λ = 1 is stored; every other λ follows from s̃_t and s̃_0); uniform query token
    weights, so the study reads the plain and contrastive vectors at every state."""
    return {
        "scoring": {"preconditioner": precond, "normalisation": norm, "base_weight": -1.0, "query_kind": kind,
                    "query_weighting": "uniform"}
    }  # fmt: skip


def variant_key(precond: str, norm: str, kind: str) -> str:
    """The timing/fingerprint key :func:`run_system` uses for a variant."""
    return json.dumps(variant(precond, norm, kind), sort_keys=True)
