"""Lineage-store benchmark on synthetic vectors (DESIGN.md section 8: query and storage bars).

    .venv/bin/python -m benchmarks.store_bench --n 100000 --checkpoints 5 --dim 1024

Writes N samples × (base + T checkpoints) float16 vectors of dimension D into a real store in a
temporary folder, then measures:
- bytes on disk per sample per checkpoint (embeddings table);
- full DDA for one new query from its (given) query vectors: read each checkpoint's vectors, score,
  cosine-normalise, debias against the base, fold into the running state — wall time, cold (first
  read) and warm (median of 3);
- the incremental update when one more checkpoint arrives (one checkpoint's work, not T);
- top-k lineage through DuckDB SQL (``top_sources``, k = 10) over a dda_state of N and ``--n-sql``
  rows: p50/p95 of 20 runs.

Measured 2026-11-21 on the project machine (2 CPUs), N = 100 000, base + 5 checkpoints, float16
vectors, cosine-normalised debias + denoise of one query (results/store_bench_d*.json):

| D | bytes / sample / checkpoint | full DDA warm | full DDA cold | one new checkpoint |
| --- | --- | --- | --- | --- |
| 512 | 1 040 | 0.87 s | 1.83 s | 0.16 s |
| 1 024 | 2 064 | 2.22 s | 2.41 s | 0.28 s |
| 3 840 | 7 696 | 8.31 s | 13.18 s | 1.23 s |

D = 3 840 is the default projection on SmolLM2-135M since the hallucination benchmark (8×8 on the 30
``o_proj`` + 30 ``down_proj``), measured 2026-11-22 with ``--dim 3840 --n-sql``. This bench scores with
the identity; the default Fisher preconditioner also fits a per-module covariance per checkpoint at
every refresh: 3.79 s per checkpoint for 100 000 × 3 840 (measured with ``dda_kernel``'s
``covariance_update`` + ``fit_preconditioner`` on random float16 vectors), not yet persisted.

SQL ``top_sources`` (k = 10) over the lineage of one query: p50 88 ms / p95 98 ms at 100 000
samples, p50 660 ms / p95 764 ms at 1 000 000 (run with ``--dim 1024 --n-sql 100000 1000000``).
The 2 s bar holds up to D ≈ 900 on these CPUs; reading the Lance column (≈ 0.6 GB/s) dominates, so
the default D = 3 840 misses it by about 4× (and more with the Fisher fit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dda_kernel import dda_init, dda_update, dda_value, debias, normalise_scores, row_norms
from storage.samples import SampleIn, ingest_samples
from storage.scores import StoredState, write_dda_state
from storage.sql import named_query
from storage.store import LineageStore
from storage.vectors import read_embeddings, write_embeddings


def fill(store: LineageStore, n: int, checkpoints: list[str], dim: int, chunk: int = 20000) -> None:
    rng = np.random.default_rng(0)
    ids = [f"s{i:07d}" for i in range(n)]
    for c in checkpoints:
        for start in range(0, n, chunk):
            vec = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
            write_embeddings(store, c, ids[start : start + chunk], vec, np.zeros(len(vec)), np.ones(len(vec)))
        print(f"  wrote {n} vectors at {c}", flush=True)


def scores_at(store: LineageStore, checkpoint: str, query: torch.Tensor) -> torch.Tensor:
    """Cosine-normalised s̃_t(q, ·) for one checkpoint, reading its vectors from the store."""
    matrix = read_embeddings(store, checkpoint)
    g = torch.from_numpy(matrix.vectors).float()
    raw = (query @ g.T)[:, torch.from_numpy(matrix.order)]
    norms = torch.from_numpy(matrix.grad_norms[matrix.order])
    return normalise_scores(raw, "cosine", row_norms(query), norms)


def full_dda(store: LineageStore, checkpoints: list[str], queries: dict[str, torch.Tensor]) -> torch.Tensor:
    base = scores_at(store, "base", queries["base"])
    state = dda_init(1, base.shape[1])
    for c in checkpoints:
        state = dda_update(state, c, debias(scores_at(store, c, queries[c]), base))
    return dda_value(state)


def sql_latency(store: LineageStore, n_rows: int, runs: int = 20) -> dict[str, float]:
    """p50/p95 seconds of top_sources(k=10) over a dda_state of n_rows samples for one query."""
    rng = np.random.default_rng(1)
    ids = [f"s{i:07d}" for i in range(n_rows)]
    existing = store.table("samples").count_rows()
    if existing < n_rows:
        rows = [SampleIn(id=i, prompt="p", response=f"r{i}", source=f"src{int(i[1:]) % 7}") for i in ids[existing:]]
        ingest_samples(store, rows, "synthetic")
    state = StoredState(["q-sql"], ids, rng.standard_normal((1, n_rows)), np.array([5.0]), [frozenset({"c"})])
    write_dda_state(store, f"bench-{n_rows}", state)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        named_query(store, "top_sources", query_id="q-sql", k=10)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"p50": statistics.median(times), "p95": times[int(0.95 * (runs - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--n-sql", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    checkpoints = [f"c{t}" for t in range(1, args.checkpoints + 1)]
    report: dict[str, object] = {"n": args.n, "checkpoints": args.checkpoints, "dim": args.dim}
    with tempfile.TemporaryDirectory() as tmp:
        store = LineageStore.open(Path(tmp), projection_fingerprint=f"synthetic-{args.dim}", dim=args.dim)
        start = time.perf_counter()
        fill(store, args.n, ["base", *checkpoints], args.dim)
        report["write_seconds"] = time.perf_counter() - start
        per = store.disk_bytes("embeddings") / (args.n * (args.checkpoints + 1))
        report["bytes_per_sample_per_checkpoint"] = per
        print(f"store: {per:.0f} bytes per sample per checkpoint (raw vector {2 * args.dim} bytes)")
        gen = torch.Generator().manual_seed(2)
        queries = {c: torch.randn(1, args.dim, generator=gen) for c in ["base", *checkpoints]}
        start = time.perf_counter()
        full_dda(store, checkpoints, queries)
        report["dda_cold_seconds"] = time.perf_counter() - start
        warm = []
        for _ in range(3):
            start = time.perf_counter()
            full_dda(store, checkpoints, queries)
            warm.append(time.perf_counter() - start)
        report["dda_warm_seconds"] = statistics.median(warm)
        start = time.perf_counter()
        scores_at(store, checkpoints[-1], queries[checkpoints[-1]])
        report["one_checkpoint_update_seconds"] = time.perf_counter() - start
        print(
            f"full DDA, 1 query × {args.n} samples × {args.checkpoints} checkpoints + base: "
            f"cold {report['dda_cold_seconds']:.2f} s, warm {report['dda_warm_seconds']:.2f} s; "
            f"one new checkpoint {report['one_checkpoint_update_seconds']:.2f} s"
        )
        for n_rows in args.n_sql:
            lat = sql_latency(store, n_rows)
            report[f"sql_top10_{n_rows}"] = lat
            print(
                f"SQL top_sources k=10 over {n_rows} samples: "
                f"p50 {lat['p50'] * 1e3:.0f} ms, p95 {lat['p95'] * 1e3:.0f} ms"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
