"""``dda demo``: the whole pipeline end to end on the embedded world, everything under one data folder.

Build (or reuse) the world, ingest its training file, run the index flow over the base model and every
checkpoint, register the hallucinated outputs as queries and attribute them, then read the answer
back through SQL: the top sources of the first query, the influence shares by source, and the ROC-AUC
of the lineage ranking against the known corrupted samples (computed in SQL, Mann–Whitney with ties).
The governance report of every traced output is written to ``<data_dir>/report``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.pipeline import attribute, governance_report, index_run, load_settings, task_runner, writing
from flows.settings import DDASettings
from storage.samples import SampleIn, ingest_samples, read_rows
from storage.sql import named_query, query
from storage.store import LineageStore
from tasks.demo import DemoModel, DemoWorld, build_world

Log = Callable[[str], None]

# Mann–Whitney AUC per query over a ``scored`` (query_id, sample_id, value) relation:
# (Σ average ranks of positives − P(P+1)/2) / (P·N); ties get their mean rank.
AUC_TEMPLATE = """
WITH scored AS ({scored}), labelled AS (
    SELECT sc.query_id, sc.value, json_extract_string(s.meta_json, '$.corrupted')::BOOLEAN::INT AS p
    FROM scored sc JOIN samples s USING (sample_id)
), ranked AS (
    SELECT query_id, p, rank() OVER (PARTITION BY query_id ORDER BY value)
             + (count(*) OVER (PARTITION BY query_id, value) - 1) / 2.0 AS r
    FROM labelled
)
SELECT query_id, (sum(r * p) - sum(p) * (sum(p) + 1) / 2.0) / (sum(p) * sum(1 - p)) AS auc
FROM ranked GROUP BY query_id ORDER BY query_id"""

# The rankings the demo compares, each read from the SQL views of one settings fingerprint ($fp).
RANKINGS = {
    "DDA (the lineage view)": "SELECT query_id, sample_id, dda_score AS value FROM lineage "
    "WHERE settings_fingerprint = $fp",
    "denoise only (mean of s̃_t, λ = 0)": "SELECT query_id, sample_id, avg(score) AS value FROM scores "
    "WHERE settings_fingerprint = $fp GROUP BY query_id, sample_id",
    "last checkpoint only (s̃_T)": "SELECT query_id, sample_id, score AS value FROM scores JOIN checkpoints "
    "USING (checkpoint_id) WHERE settings_fingerprint = $fp AND step = (SELECT max(step) FROM checkpoints)",
    "base model only (s̃_0)": "SELECT query_id, sample_id, any_value(base_score) AS value FROM scores "
    "WHERE settings_fingerprint = $fp GROUP BY query_id, sample_id",
}


@dataclass(frozen=True)
class DemoReport:
    """What the demo read back through SQL."""

    world: DemoWorld
    settings_fingerprint: str
    first_query: dict[str, Any] | None
    top_sources: list[dict[str, Any]]
    source_shares: list[dict[str, Any]]
    auc: dict[str, dict[str, float]]
    report_html: str | None = None

    def mean_auc(self, ranking: str = "DDA (the lineage view)") -> float:
        """Mean ROC-AUC over the traced outputs of one of :data:`RANKINGS`."""
        values = self.auc.get(ranking, {})
        return sum(values.values()) / len(values) if values else float("nan")


def demo_settings(data_dir: Path, world: DemoWorld, progress: bool) -> DDASettings:
    """Settings of the demo: the user's environment, with the world's base model and run, small shards."""
    return load_settings(
        {"indexing": {"shard_size": 96, "batch_size": 32, "progress": progress}},
        data_dir=str(data_dir), base_model=world.base_model, run_dir=world.run_dir, run_id="demo-run",
    )  # fmt: skip


def _check_same_world(data_dir: Path, seed: int, model: str) -> None:
    """Refuse to replace the demo world of an indexed data folder (its store refers to that world's files)."""
    marker = data_dir / "demo" / "world.json"
    if not marker.is_file() or not (data_dir / "store").exists():
        return
    built = json.loads(marker.read_text())
    if (built["model"], built["seed"]) != (model, seed):
        raise ValueError(
            f"data folder {data_dir} holds the demo of model {built['model']} with seed {built['seed']}: "
            "use another --data-dir for another demo"
        )


def run_demo(
    data_dir: str | Path, seed: int = 0, model: DemoModel = "smollm2", log: Log = print, progress: bool = True
) -> DemoReport:
    """Build/reuse the world, ingest, index, attribute, and read the lineage back through SQL."""
    data_dir = Path(data_dir).resolve()
    with writing(load_settings(data_dir=str(data_dir)), "dda demo"):
        return _run_demo(data_dir, seed, model, log, progress)


def _run_demo(data_dir: Path, seed: int, model: DemoModel, log: Log, progress: bool) -> DemoReport:
    _check_same_world(data_dir, seed, model)
    world = build_world(data_dir / "demo", seed=seed, model=model, log=log)
    settings = demo_settings(data_dir, world, progress)
    store = LineageStore.open(data_dir / "store")
    added = ingest_samples(store, read_rows(world.train_file, SampleIn), dataset="demo-train")
    log(f"ingested {added.added} new training samples ({added.unchanged} already registered)")
    payload = settings.model_dump(mode="json")
    runner = task_runner(settings)
    indexed = index_run.with_options(task_runner=runner)(settings=payload)
    log(f"indexed: {', '.join(indexed['indexed']) or 'nothing new'}")
    if world.n_hallucinated == 0:
        log("no unseen document was summarised with the canary target: nothing to trace")
        return DemoReport(world, settings.fingerprint, None, [], [], {})
    traced = attribute.with_options(task_runner=runner)(queries_file=world.queries_file, settings=payload)
    log(f"attributed {traced['queries']} outputs ({traced['folds']} new checkpoint folds)")
    written = governance_report(settings=payload)
    log(f"governance report ({written['queries']} outputs, {written['plots']} plots): {written['html']}")
    store = LineageStore.open(data_dir / "store")
    fp = settings.fingerprint
    first = query(store, "SELECT * FROM queries ORDER BY query_id LIMIT 1").to_pylist()[0]
    top = named_query(store, "top_sources", fp, query_id=first["query_id"], k=5).to_pylist()
    shares = named_query(store, "influence_by_source", fp, query_id=first["query_id"]).to_pylist()
    auc = {
        name: {
            r["query_id"]: float(r["auc"])
            for r in query(store, AUC_TEMPLATE.format(scored=sql), {"fp": fp}).to_pylist()
        }
        for name, sql in RANKINGS.items()
    }
    return DemoReport(world, fp, first, top, shares, auc, written["html"])
