"""BM25 on every fine-tuning seed of the out-of-world cells: does the word-overlap baseline move with the seed?

    python -m benchmarks.bm25_seeds       # → benchmarks/results/bm25_seeds.json

BM25 (:mod:`benchmarks.bm25`) needs no model, but its outputs are each seed's own hallucinations, so it differs
per fine-tuning run. For each cell of :data:`benchmarks.out_of_world.CELLS` whose fine-tuning run is cached (seed
0 in ``.bench-work/<size>``, other seeds in ``.bench-work/<size>-seed<N>``; a missing run is skipped, never
built), the outputs traced there are ranked by BM25 (prompt + output against the training texts) and scored
against the known culprits exactly as the no-correction benchmark scores its ``bm25`` row (mean ROC-AUC, AP and
the bootstrap ``ci95``). BM25 has no setting to choose, so its rows are ``selection = out_of_world``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "bm25_seeds.json"
WORK = Path(__file__).resolve().parents[1] / ".bench-work"


def measure(size_name: str, mode: str, seed: int) -> dict[str, Any] | None:
    """The ``bm25`` row of one cached cell (None when its fine-tuning run is not cached)."""
    from benchmarks.hallucination import SIZES, cell_fields, log_line, mode_context, prepare_mode, prepare_work, record
    from benchmarks.hallucination.methods import bm25_rankings

    folder = WORK / (size_name if seed == 0 else f"{size_name}-seed{seed}")
    if not (folder / mode / "queries.jsonl").is_file():
        return None
    work, base_dir = prepare_work(size_name, None if seed == 0 else folder)
    prepared = prepare_mode(work, base_dir, mode, SIZES[size_name], seed, log_line)
    ctx, queries, texts = mode_context(work / mode, prepared)
    bm25, _ = bm25_rankings(texts, queries)
    row = record(mode, "counterfactual", "bm25", ctx.score(bm25["plain"]), 0.0)
    return {**cell_fields(size_name, "bm25"), "size": size_name, "seed": seed, "outputs": len(queries), **row}


def main() -> int:
    """Every cached cell's BM25 row, and per (size, mode) the mean ± sd over seeds."""
    from benchmarks.hallucination import machine
    from benchmarks.out_of_world import CELLS

    t0 = time.perf_counter()
    rows = [r for cells in CELLS.values() for cell in cells if (r := measure(*cell)) is not None]
    summary = []
    for size_name, mode in sorted({(r["size"], r["mode"]) for r in rows}):
        aucs = [r["mean_auc"] for r in rows if (r["size"], r["mode"]) == (size_name, mode)]
        sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        summary.append({"size": size_name, "mode": mode, "seeds": len(aucs), "mean_auc": statistics.mean(aucs),
                        "sd": sd})  # fmt: skip
    report = {"command": "python -m benchmarks.bm25_seeds", "machine": machine(), "results": rows,
              "summary": summary, "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    RESULTS.write_text(json.dumps(report, indent=1))
    for r in rows:
        print(f"{r['size']} {r['mode']} seed {r['seed']}: BM25 {r['mean_auc']:.3f} (AP {r['ap']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
