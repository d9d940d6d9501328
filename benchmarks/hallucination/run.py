"""Command line of the hallucination benchmark: build, run every method, write JSON + Markdown + PNG."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.hallucination.config import MODES, RESULTS, SIZES, cell_fields, log_line, machine, prepare_work
from benchmarks.hallucination.evaluation import evaluate_mode
from benchmarks.hallucination.report import markdown, plot
from benchmarks.hallucination.worlds import prepare_mode
from flows.settings import code_version
from tasks.config import ScoringConfig


def main(argv: list[str] | None = None) -> int:
    """Entry point: build, run every method, write JSON + Markdown + PNG under ``--out``."""
    parser = argparse.ArgumentParser(
        description="Hallucination-tracing benchmark: which method finds the corrupted training samples?"
    )
    parser.add_argument("--quick", action="store_true", help="the small size (the test suite runs it)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default .bench-work/<size>)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON/Markdown/PNG results")
    parser.add_argument("--cea-fp32", action="store_true", help="CEA loss sweeps in float32 (default: bf16 autocast)")
    parser.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    args = parser.parse_args(argv)
    size_name = "quick" if args.quick else "default"
    size = SIZES[size_name]
    work, base_dir = prepare_work(size_name, args.work, args.verbose)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python -m benchmarks.hallucination " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "seed": args.seed, "size": size_name, "sizes": asdict(size),
        "cea_bf16": not args.cea_fp32, "defaults": ScoringConfig().model_dump(), "code": code_version(),
        "modes": {}, "results": [], "study": {}, "extra": {},
    }  # fmt: skip
    for mode in args.modes:
        prepared = prepare_mode(work, base_dir, mode, size, args.seed, log_line)
        report["modes"][mode] = {
            k: prepared[k] for k in ("n_train", "n_corrupted", "train_seconds", "generate_seconds", "per_pair")
        }
        result = evaluate_mode(work, base_dir, mode, size, args.seed, prepared, not args.cea_fp32, log_line)
        report["results"] += [{**cell_fields(size_name, r["method"]), **r} for r in result.records]
        report["study"][mode] = result.study
        report["extra"][mode] = result.extra
    report["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("hallucination_quick" if args.quick else "hallucination")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    return 0
