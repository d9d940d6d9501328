"""kronfluence's EK-FAC influence beside DDA lineage, on the same world, fine-tuning run and traced outputs as the
hallucination benchmark (benchmarks/README.md, "The field's tools").

    python -m benchmarks.kronfluence_ekfac --size default [--mode lora] [--venv .bench-work/tda-venv] [--reuse]

kronfluence (PyPI ``kronfluence==1.0.1``, the reference EK-FAC implementation) is a benchmark-only dependency in
the environment of :mod:`benchmarks.bergson_trackstar` (add it there with ``pip install -c constraints.txt
kronfluence==1.0.1``, then ``pip uninstall -y torchvision``), never imported by this project: each stage runs
``benchmarks/kronfluence_worker.py`` with that environment's Python, one process per stage and checkpoint.

Per checkpoint of the cached LoRA fine-tuning run, the adapter as it is (its ``lora_A`` / ``lora_B`` linears
tracked): EK-FAC factors of the training pairs (true Fisher, labels sampled), then pairwise scores of the same
three query sets as the TrackStar rows — each output y, its known correction y_c, and the correction y'_t DDA
lineage derived at t (``benchmarks.no_correction``'s store; run that first) — with each query's response loss as
the measurement. Rows (mean of the per-checkpoint scores, and ``…_last``): ``kronfluence_ekfac`` s_t(y),
``kronfluence_ekfac@counterfactual`` s_t(y) − s_t(y'_t), ``kronfluence_ekfac@contrastive`` s_t(y) − s_t(y_c);
time-to-scores is the workers' wall time, start-up included.

Results: ``benchmarks/results/kronfluence_<size>_<mode>.json``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bergson_trackstar import add_states, query_sets, tool_cell, tool_rows
from benchmarks.hallucination.config import RESULTS, log_line, machine

WORKER = Path(__file__).with_name("kronfluence_worker.py")


def run_stage(python: Path, spec: dict[str, Any], folder: Path) -> float:
    """One worker stage for one checkpoint (its spec written under ``folder``); its wall seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec['stage']}.json"
    path.write_text(json.dumps(spec))
    started = time.perf_counter()
    done = subprocess.run([str(python), str(WORKER), str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"kronfluence {spec['stage']} failed on {Path(spec['checkpoint']).name}: "
                           f"{done.stderr[-3000:]}")  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    a, work, root, ctx, queries, derived = tool_cell(__doc__, ["lora"], "worker")
    rows_by_id = {r["id"]: r for r in (json.loads(line) for line in (root / "train.jsonl").read_text().splitlines())}
    train = [{"prompt": rows_by_id[s]["prompt"], "response": rows_by_id[s]["response"]} for s in ctx.sids]
    ckpts = sorted((root / "run").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    out_file = RESULTS / f"kronfluence_{a.size}_{a.mode}.json"
    earlier = json.loads(out_file.read_text())["seconds_per_checkpoint"] if a.reuse and out_file.is_file() else {}
    cubes: dict[str, list[np.ndarray]] = {"plain": [], "counterfactual": [], "contrastive": []}
    seconds: dict[str, float] = {}
    m = len(queries)
    for ckpt in ckpts:
        folder = (root / "kronfluence" / ckpt.name).resolve()
        spec = {"base": str((work / "base-model").resolve()), "checkpoint": str(ckpt.resolve()), "train": train,
                "queries": query_sets(queries, derived, ckpt.name), "out": str(folder)}  # fmt: skip
        if ckpt.name in earlier and (folder / "scores.npy").is_file():  # --reuse: the scores and time of the last run
            seconds[ckpt.name] = earlier[ckpt.name]
        else:
            stages = ("factors", "scores")
            seconds[ckpt.name] = round(sum(run_stage(a.venv / "bin" / "python", {**spec, "stage": s}, folder)
                                           for s in stages), 1)  # fmt: skip
        scores = np.load(folder / "scores.npy")
        if scores.shape != (3 * m, len(train)):
            raise RuntimeError(f"scores of shape {scores.shape}, expected {(3 * m, len(train))}")
        add_states(cubes, scores, m)
        log_line(f"{ckpt.name}: kronfluence EK-FAC in {seconds[ckpt.name]} s")
    rows = tool_rows("kronfluence_ekfac", cubes, seconds, a.size, a.mode, ctx)
    report: dict[str, Any] = {
        "command": f"python -m benchmarks.kronfluence_ekfac --size {a.size} --mode {a.mode}", "machine": machine(),
        "kronfluence": "1.0.1", "strategy": "ekfac", "results": rows, "seconds_per_checkpoint": seconds,
        "n_outputs": m, "n_train": len(train),
    }  # fmt: skip
    out_file.write_text(json.dumps(report, indent=1) + "\n")
    log_line(f"wrote {out_file}")


if __name__ == "__main__":
    main()
