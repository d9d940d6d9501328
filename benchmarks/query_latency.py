"""Query latency on the production path (benchmarks/README.md: query and storage bars).

    .venv/bin/python -m benchmarks.query_latency            # N = 100 000, D = 3 840, base + 5 checkpoints

Builds a synthetic store in a temporary folder through the storage API the way indexing writes it
(embeddings written shard by shard, then :func:`tasks.indexing.finish_checkpoint`'s steps: finalize,
compact, checkpoint row, tag), with the SmolLM2-135M default projection layout (8 × 8 on the 30
``o_proj`` + 30 ``down_proj``: D = 3 840), default settings (Fisher, z-score, λ = 0). Query vectors are
written as :func:`tasks.indexing.embed_queries` writes them; embedding a query with the model (one forward
and backward per state) is not part of these figures (``benchmarks/embed_throughput.py``). Then it times
:func:`tasks.attribution.refresh_queries`, the function ``dda attribute`` runs after registering its
queries, on queries already embedded:

- ``new_query_s``: one new query against base + 5 checkpoints (cold: first call in this process after the
  store was built; warm: median of 3 further new queries);
- ``new_queries_64_s``: 64 new queries in one call;
- ``new_checkpoint_100q_s``: 100 registered queries whose lineage covers base + 4; a fifth checkpoint is
  indexed, then one call folds it into all 100;
- ``sql_cli_s``: ``dda sql`` top-10 of one query's lineage through the CLI (a subprocess, median of 3), beside
  ``python_import_floor_s`` = ``python -c "import duckdb, lancedb, pyarrow"`` (median of 3);
- ``bytes_per_sample_per_checkpoint``: the Lance ``embeddings`` table on disk / (N × states); the derived,
  rebuildable query matrices are reported beside it (``finalized_bytes_per_sample_per_checkpoint``).

Results: ``benchmarks/results/query_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from dda_kernel import ProjectionSpec, make_layout
from storage import finalized
from storage.registry import write_checkpoint
from storage.samples import QueryIn, SampleIn, ingest_samples, register_queries
from storage.store import LineageStore, utcnow
from storage.vectors import write_embeddings, write_query_embeddings
from tasks.attribution import refresh_queries
from tasks.config import PipelineConfig
from tasks.finalize import finalize_checkpoint, layout_record

RESULTS = Path(__file__).parent / "results" / "query_latency.json"
SMOLLM2_MODULES = [
    (f"model.layers.{i}.{name}", d_in, 576)
    for i in range(30)
    for name, d_in in (("self_attn.o_proj", 576), ("mlp.down_proj", 1536))
]


def _layout() -> Any:
    return make_layout(ProjectionSpec(), SMOLLM2_MODULES)


def build(root: Path, n: int, checkpoints: list[str], shard: int, seed: int = 0) -> LineageStore:
    """Samples and the base + ``checkpoints`` vectors, written and finished as indexing does."""
    layout = _layout()
    store = LineageStore.open(root / "store", layout.fingerprint, layout.dim, layout_record(layout))
    rows = [SampleIn(id=f"s{i:07d}", prompt=f"document {i}", response=f"summary {i}", source=f"src{i % 7}")
            for i in range(n)]  # fmt: skip
    ingest_samples(store, rows, dataset="synthetic")
    for c in checkpoints:
        index_checkpoint(store, c, n, shard, seed)
    return store


def index_checkpoint(
    store: LineageStore, checkpoint_id: str, n: int, shard: int, seed: int, layout: Any = None,
    where: tuple[str, str] | None = None,
) -> None:  # fmt: skip
    """One checkpoint's vectors (random, float32 → stored float16), shard by shard, then finished.

    ``layout``: the projection layout (default: SmolLM2's default one); ``where``: the (path, fingerprint) its
    ``checkpoints`` row records (default: a synthetic path), e.g. a real model folder that tracing will load."""
    layout = layout or _layout()
    rng = np.random.default_rng([seed, len(checkpoint_id), sum(map(ord, checkpoint_id))])
    ids = [f"s{i:07d}" for i in range(n)]
    scale = np.exp(rng.standard_normal(layout.dim)).astype(np.float32) * 1e-3  # anisotropic, like real gradients
    for start in range(0, n, shard):
        m = min(shard, n - start)
        vectors = rng.standard_normal((m, layout.dim), dtype=np.float32) * scale
        write_embeddings(store, checkpoint_id, ids[start : start + m], vectors, np.ones(m), np.full(m, 64))
    step = 0 if checkpoint_id == "base" else int(checkpoint_id.split("-")[-1])
    row = {"checkpoint_id": checkpoint_id, "run_id": "" if step == 0 else "run",
           "role": "base" if step == 0 else "finetuned", "step": step, "epoch": step / 100, "learning_rate": 1e-4,
           "path": where[0] if where else f"/synthetic/{checkpoint_id}",
           "fingerprint": where[1] if where else f"fp-{checkpoint_id}",
           "projection_fingerprint": layout.fingerprint, "indexed_at": utcnow()}  # fmt: skip
    finalize_checkpoint(store, row, layout)
    store.compact(("embeddings", "query_embeddings", "samples"))
    store.prune(("embeddings", "query_embeddings", "samples", "scores", "dda_state"))
    write_checkpoint(store, row)
    store.tag_checkpoint(checkpoint_id)


def add_queries(store: LineageStore, prefix: str, count: int, checkpoints: list[str], seed: int) -> list[str]:
    """Register ``count`` plain queries and write their vectors at every checkpoint."""
    rows = [QueryIn(id=f"{prefix}{i:04d}", prompt=f"question {i}", response=f"answer {i}") for i in range(count)]
    ids = register_queries(store, rows)
    rng = np.random.default_rng([seed, count])
    for c in checkpoints:
        write_query_embeddings(store, c, "plain", ids, rng.standard_normal((count, _layout().dim), dtype=np.float32))
    return ids


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write and return the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument("--shard", type=int, default=2048, help="rows per embeddings write (one per indexing shard)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    config = PipelineConfig()
    states = ["base"] + [f"run/checkpoint-{100 * (t + 1)}" for t in range(args.checkpoints)]
    with tempfile.TemporaryDirectory(prefix="dda-query-latency-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        store = build(root, args.n, states[:-1], args.shard)
        build_s = time.perf_counter() - t0
        registered = add_queries(store, "r", 100, states[:-1], seed=1)
        refresh_queries(root, "unused", registered, config)  # their lineage over base + T-1
        t0 = time.perf_counter()
        index_checkpoint(store, states[-1], args.n, args.shard, 0)
        index_last_s = time.perf_counter() - t0
        add = list(registered)
        for c in states[-1:]:
            write_query_embeddings(store, c, "plain", add, np.random.default_rng(2).standard_normal(
                (len(add), _layout().dim), dtype=np.float32))  # fmt: skip
        new_checkpoint = _timed(lambda: refresh_queries(root, "unused", registered, config))
        singles = []
        for k in range(4):
            q = add_queries(store, f"new{k}-", 1, states, seed=10 + k)
            singles.append(_timed(lambda q=q: refresh_queries(root, "unused", q, config)))
        batch = add_queries(store, "b", 64, states, seed=3)
        many = _timed(lambda: refresh_queries(root, "unused", batch, config))
        sql = f"SELECT rank, sample_id, dda_score FROM lineage WHERE query_id = '{batch[0]}' AND rank <= 10"
        dda = str(Path(sys.executable).with_name("dda"))
        env = {**os.environ, "DDA_DATA_DIR": str(root)}
        sql_runs = [_wall([dda, "sql", sql], env) for _ in range(3)]
        floor_runs = [_wall([sys.executable, "-c", "import duckdb, lancedb, pyarrow"]) for _ in range(3)]
        n_states = len(states)
        disk_now = store.disk_bytes("embeddings")
        store.prune(["embeddings"], timedelta(0))  # as after the retention window: superseded shard files go
        lance = store.disk_bytes("embeddings")
        cache = finalized.disk_bytes(store)
    results = {
        "new_query_s": round(statistics.median(singles[1:]), 3),
        "new_query_cold_s": round(singles[0], 3),
        "new_queries_64_s": round(many, 3),
        "new_checkpoint_100q_s": round(new_checkpoint, 3),
        "sql_cli_s": round(statistics.median(sql_runs), 3),
        "python_import_floor_s": round(statistics.median(floor_runs), 3),
        "bytes_per_sample_per_checkpoint": round(lance / (args.n * n_states)),
        "finalized_bytes_per_sample_per_checkpoint": round(cache / (args.n * n_states)),
        "embeddings_bytes_before_prune_per_sample_per_checkpoint": round(disk_now / (args.n * n_states)),
        "index_one_checkpoint_s": round(index_last_s, 2),
        "build_s": round(build_s, 1),
        "n_samples": args.n,
        "dim": _layout().dim,
        "states": n_states,
        "settings": {
            "preconditioner": config.scoring.preconditioner,
            "normalisation": config.scoring.normalisation,
            "debias_coefficient": config.scoring.debias_coefficient,
        },
    }
    return write_results(results, args.out)


def write_results(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Add the machine and the time to ``results``, write them to ``out`` as JSON, print and return them."""
    results = {**results, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                      "platform": platform.platform()},
               "measured_at": utcnow().isoformat(timespec="seconds")}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
